"""LeNet-5 on the CPU: training-step images/s at batch 64, 128 and 256 and inference at batch
1000, beside the same LeNet-5 in PyTorch (same process, same thread count) when it is installed.

    python examples/benchmark_cpu.py
    python examples/benchmark_cpu.py --layers   # the uncompiled model: eager autograd, op by op

gpuconv's rows run gpuconv.compile(model), the CPU executor, as `python -m gpuconv train` does;
--layers runs the model itself (the reference path). `python -m gpuconv bench --devices cpu
--compare-torch` (and `--eager`) gives the same with every figure.
"""
import sys

from gpuconv import bench

results = bench.run(devices=["cpu"], batch_sizes=[64, 128, 256], inference_batch_sizes=[1000],
                    compare_torch=True, repeat=10, warmup=3, peak_size=0, compiled="--layers" not in sys.argv)
print(bench.machine_line(results))
if not results["torch"]["available"]:
    print(f"(no PyTorch comparison: {results['torch']['reason']})")
print(f"{'':<22}{'gpuconv img/s':>15}{'min-max':>20}" + (f"{'PyTorch img/s':>15}{'torch/ours':>12}"
                                                       if results["torch"]["available"] else ""))
for row in results["rows"]:
    figures = row["gpuconv"]
    label = f"{'train' if row['kind'] == 'step' else 'inference'} batch {row['batch_size']}"
    spread = f"{figures['images_per_s_min']:,.0f}-{figures['images_per_s_max']:,.0f}"
    line = f"{label:<22}{figures['images_per_s']:>15,.0f}{spread:>20}"
    if row["torch"]:
        line += f"{row['torch']['images_per_s']:>15,.0f}{row['speed_ratio_vs_torch']:>12.2f}"
    print(line)
print("torch/ours = PyTorch time / gpuconv time: > 1 means gpuconv is faster.")
