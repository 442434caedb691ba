"""Work on NumPy arrays split over the batch: in parts, one per core (the caller's thread and the
array ops' worker threads, gpuconv.nn.cpu_plan.run_in_parts, with a 1-thread BLAS for the call),
each part in chunks of images of about `chunk_bytes`, so that a chunk's temporaries stay in the
core's cache. The helpers behind norm_cpu.py and ReLU on the CPU; conv_cpu.py splits the same way.

The split depends on the batch size and the worker count alone, and sums over parts are added in
part order, so a result never depends on timing.
"""


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
