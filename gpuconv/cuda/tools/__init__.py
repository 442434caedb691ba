"""Development tooling for the CUDA path; nothing here runs in a training step.

offline   compile kernels/*.cu with NVRTC for every target architecture, no GPU needed
check     `python -m gpuconv check-kernels`: the offline compile as a table
plan      `python -m gpuconv kernel-plan`: LeNet-5's launches on paper
gpu_check `python -m gpuconv gpu-check`: the first run on a real GPU, in one command
mutants   `python -m gpuconv mutants`: mutation testing of kernels/*.cu against the emulated tests
"""
