"""Compare gpuconv's devices (and PyTorch, when it is installed) from Python.

    python examples/compare_devices.py

The same as `python -m gpuconv bench --ops --compare-torch --batch-sizes 64,256`: a device that
cannot run here (no GPU) is skipped with the reason.
"""
from gpuconv import bench

results = bench.run(devices=["cpu", "cuda"], batch_sizes=[64, 256], ops=True, compare_torch=True,
                    repeat=5, warmup=2)
print(bench.format_table(results))

print("\ntraining step, images/s (median):")
for row in results["rows"]:
    if row["kind"] == "step":
        ours = row["gpuconv"]["images_per_s"]
        line = f"  {row['device']:<7} {row['algo']:<7} batch {row['batch_size']:>4}: {ours:9,.0f}"
        if row["speedup_vs_cpu"] and row["device"] != "cpu":
            line += f"  ({row['speedup_vs_cpu']:.1f}x the CPU)"
        if row["torch"]:
            line += f"  PyTorch {row['torch']['images_per_s']:9,.0f}  (torch/ours {row['speed_ratio_vs_torch']:.2f})"
        print(line)
