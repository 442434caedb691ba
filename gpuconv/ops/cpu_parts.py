"""Work on NumPy arrays split over the batch: in parts, one per core (the caller's thread and the
array ops' worker threads, gpuconv.nn.cpu_plan.run_in_parts, with a 1-thread BLAS for the call),
each part in chunks of images of about `chunk_bytes`, so that a chunk's temporaries stay in the
core's cache. The helpers behind norm_cpu.py, and behind elementwise(), which splits an array's
elements the same way: ReLU's forward and backward on large arrays (activation.py) and autograd's
Add of two large float32 arrays. conv_cpu.py splits the same way.

The split depends on the batch size and the worker count alone, and sums over parts are added in
part order, so a result never depends on timing.
"""
import numpy as np

# Elementwise ops take parts from this size of result up (a caller may ask for more); smaller
# arrays run whole, in the caller's thread: an empty region took 60-110 us on a 2-core VM (more on
# a busy machine), and one core alone nearly fills the memory bandwidth on a few MiB. On that 2-core
# VM, ReLU's backward and the add ran mostly 1.1-1.8x as fast in parts on 4-8 MiB, and 0.7-1.2x on
# 2-3 MiB (the commit that set this has the figures).
ELEMENTWISE_MIN_BYTES = 4 << 20
# A part's chunk: ReLU's backward makes mask temporaries per chunk, which then stay in the cache
# (1 MiB: its 8 MiB backward 2.3 ms, one chunk per part 5.7 ms, 256 KiB chunks 2.8 ms).
ELEMENTWISE_CHUNK_BYTES = 1 << 20
# Parts and chunks of an elementwise op begin at multiples of this many elements (elementwise()):
# a multiple of any SIMD loop's block, and 4 KiB of float32.
ELEMENTWISE_BLOCK = 1024


# cpu_plan is imported inside the functions: gpuconv.nn imports the ops, so a module-level import
# would be circular.

def in_parts(function, batch):
    """function(start, stop) for each part of range(batch) -> the results in part order."""
    from ..nn.cpu_plan import run_in_parts
    return run_in_parts(function, batch)


def one_worker_count():
    """A block whose parallel regions (in_parts) all use the worker count read at its start:
    for an op of several regions (cpu_plan.one_worker_count)."""
    from ..nn.cpu_plan import one_worker_count
    return one_worker_count()


def alone(function, *args):
    """function(*args) in this thread with the BLAS as it is, but never while another thread's
    region has set it to one thread (the bits would then depend on timing): cpu_plan.run_alone."""
    from ..nn.cpu_plan import run_alone
    return run_alone(function, *args)


def ranges(start, stop, step):
    """(first, last) bounds of start..stop in steps of `step` images, the last one shorter."""
    for first in range(start, stop, step):
        yield first, min(first + step, stop)


def chunks(x, start, stop, chunk_bytes):
    """Slices of x's first axis from start to stop, each about chunk_bytes (at least one image)."""
    step = max(1, chunk_bytes // (x[0].nbytes or 1))
    for first, last in ranges(start, stop, step):
        yield slice(first, last)


def each_chunk(function, x, chunk_bytes):
    """function(images) for every chunk of x's batch (a slice), in parts over the cores."""
    def part(start, stop):
        for images in chunks(x, start, stop, chunk_bytes):
            function(images)

    in_parts(part, x.shape[0])


def summed(function, x, chunk_bytes):
    """The sum of function(images) over every chunk of x's batch: each part's chunks in order,
    then the parts in part order."""
    def part(start, stop):
        total = None
        for images in chunks(x, start, stop, chunk_bytes):
            value = function(images)
            total = value if total is None else total + value
        return total

    totals = in_parts(part, x.shape[0])
    result = totals[0]
    for value in totals[1:]:
        result = result + value
    return result


def elementwise_in_parts(*arrays, min_bytes=None):
    """Whether an elementwise op on these arrays runs in parts (elementwise()): plain NumPy arrays
    of one shape and dtype, each C-contiguous, of at least min_bytes (default and floor:
    ELEMENTWISE_MIN_BYTES). Callers choose the dtypes."""
    if not all(type(a) is np.ndarray for a in arrays):  # subclasses and CuPy arrays: as they were
        return False
    first = arrays[0]
    return first.nbytes >= max(min_bytes or 0, ELEMENTWISE_MIN_BYTES) and all(
        a.shape == first.shape and a.dtype == first.dtype and a.flags.c_contiguous for a in arrays)


def elementwise(function, *inputs):
    """A new C-contiguous array of inputs[0]'s shape and dtype filled by function(*input chunks,
    out=result chunk), for arrays elementwise_in_parts accepts: their elements (flat) in parts over
    the cores, each part in chunks of about ELEMENTWISE_CHUNK_BYTES. One region.

    Bits: each element takes the same code path as in one whole-array call. NumPy runs a call's
    elements in blocks of SIMD lanes and the rest one by one, and the paths can differ: of two
    NaNs, a + b kept a's payload in the blocks and b's in the rest, and a's in a call of one
    element (NumPy 2.4, AVX-512). So every chunk begins at a multiple of ELEMENTWISE_BLOCK
    elements, and the last one, at least a block long, ends where the array ends. The caller's
    np.setbufsize holds in the parts too (it decides how NumPy buffers a misaligned array).

    Errors: the parts only note which floating-point errors NumPy met (the kinds the caller's
    np.errstate does not ignore, through errstate's call mode: no warning, no exception, no user
    code runs in a worker). Where one did, the op runs again as one whole-array call in the
    caller's thread, which warns, raises or calls back exactly as before: once, with the error
    NumPy reports first, from the caller's thread (a callback or a warning hook that runs ops would
    otherwise run on a region's worker and wait for the region's lock). Per-thread floating-point
    state set through C (a rounding mode, flush-to-zero) is the caller's in every part
    (cpu_plan._run_parallel, gpuconv/fpenv.py)."""
    watched = {kind: "ignore" if mode == "ignore" else "call" for kind, mode in np.geterr().items()}
    result = np.empty_like(inputs[0])
    flat = [a.reshape(-1) for a in inputs]  # views: the arrays are C-contiguous
    flat_result = result.reshape(-1)
    size = result.size
    blocks = max(1, size // ELEMENTWISE_BLOCK)  # the last block takes the rest of the elements
    blocks_per_chunk = max(1, ELEMENTWISE_CHUNK_BYTES // (ELEMENTWISE_BLOCK * result.itemsize))
    buffer_size = np.getbufsize()

    def part(start, stop):  # in blocks -> whether NumPy met no error the caller watches
        met = []
        with np.errstate(call=lambda kind, flag: met.append(kind), **watched):
            previous = np.setbufsize(buffer_size)
            try:
                for first, last in ranges(start, stop, blocks_per_chunk):
                    elements = slice(first * ELEMENTWISE_BLOCK, size if last == blocks else last * ELEMENTWISE_BLOCK)
                    function(*(a[elements] for a in flat), out=flat_result[elements])
            finally:
                np.setbufsize(previous)
        return not met

    if not all(in_parts(part, blocks)):
        function(*inputs, out=result)  # the caller's errstate decides, as in a whole-array call
    return result
