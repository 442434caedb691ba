"""`python -m gpuconv check-kernels`: compile every kernel instance for every target architecture with
NVRTC (no GPU needed), warnings as errors, and report ptxas's resource usage. Fails on any compile
error, warning, register spill or local-memory use."""
import argparse
import sys

from ...errors import KernelError
from ...cli import HelpFormatter
from ..runtime import KERNELS, template_instances
from .offline import ARCHS, _private_cupy, compile_offline

COLUMNS = ("kernel", "dtype", "arch", "registers", "shared_bytes", "spill_bytes", "local_bytes", "status")
_DTYPES = {"float": "float32", "double": "float64"}


def _split(name_expression):
    kernel, _, dtype = name_expression.partition("<")
    return kernel, _DTYPES.get(dtype.rstrip(">"), dtype.rstrip(">"))


def _row(source, arch, resources, status):
    kernel, dtype = _split(resources.name_expression)
    return {"source": source, "kernel": kernel, "dtype": dtype, "arch": f"sm_{arch}",
            "registers": resources.registers, "shared_bytes": resources.shared_bytes,
            "spill_bytes": resources.spills,
            "local_bytes": max(resources.stack_bytes, resources.local_bytes), "status": status}


def _status(resources):
    problems = []
    if resources.spills:
        problems.append("spills")
    if resources.uses_local_memory:
        problems.append("local memory")
    return ", ".join(problems) or "ok"


def kernel_rows(archs=ARCHS, sources=None):
    """One dict per (kernel instance, arch) with the keys in COLUMNS plus 'source'; status is 'ok' or
    what went wrong. A source that fails the strict compile is compiled again without the warning
    options, so its rows still show the resource usage that made it fail."""
    _private_cupy()  # CuPy missing or moved: one KernelError here, not one per kernel build
    rows = []
    for source in sources or KERNELS:
        names = template_instances(KERNELS[source])
        for arch in archs:
            arch = str(arch).removeprefix("sm_")
            try:
                result = compile_offline(source, arch, names)
            except KernelError as strict_error:
                message = str(strict_error).splitlines()
                errors = [line.strip() for line in message if "error" in line] or message[:1]
                try:
                    result = compile_offline(source, arch, names, strict=False)
                except KernelError:
                    for name in names:
                        kernel, dtype = _split(name)
                        rows.append({"source": source, "kernel": kernel, "dtype": dtype, "arch": f"sm_{arch}",
                                     "registers": None, "shared_bytes": None, "spill_bytes": None,
                                     "local_bytes": None, "status": "compile error: " + errors[0]})
                    continue
                for resources in result.kernels:
                    # The module as a whole failed; name this instance's own problem if it has one.
                    status = _status(resources)
                    rows.append(_row(source, arch, resources,
                                     status if status != "ok" else "module failed: " + errors[0]))
                continue
            rows.extend(_row(source, arch, resources, _status(resources)) for resources in result.kernels)
    return rows


def format_table(rows, markdown=False):
    header = ("kernel", "dtype", "arch", "regs", "smem B", "spill B", "local B", "status")
    keys = ("kernel", "dtype", "arch", "registers", "shared_bytes", "spill_bytes", "local_bytes", "status")
    lines = [[str(h) for h in header]]
    lines += [["-" if row[k] is None else str(row[k]) for k in keys] for row in rows]
    if markdown:
        out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
        return "\n".join(out)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m gpuconv check-kernels", formatter_class=HelpFormatter,
        description="Compile every CUDA kernel instance for every target architecture with NVRTC "
                    "(no GPU needed) and report registers, shared memory, spills and local memory. "
                    "Exits 1 on any compile error, warning, spill or local-memory use.")
    parser.add_argument("--arch", action="append", choices=ARCHS, metavar="ARCH",
                        help=f"compute capability to check, repeatable (default: all of {', '.join(ARCHS)})")
    parser.add_argument("--source", action="append", choices=sorted(KERNELS),
                        help="kernel source to check, repeatable (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    try:
        rows = kernel_rows(args.arch or ARCHS, args.source)
    except KernelError as exc:  # CuPy missing, or its private compile API moved
        print(f"check-kernels: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows, markdown=args.markdown))
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        print(f"\n{len(failed)} of {len(rows)} kernel builds failed", file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} kernel builds ok (no spills, no local memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
