"""ReLU's forward and backward and autograd's Add of two float32 arrays on large NumPy arrays, which
run in parts over the cores (gpuconv/ops/cpu_parts.py: elementwise), against the whole-array
expressions they replace: the same bits (NaN payloads, infinities and signed zeros included), the
same dtype, shape and contiguity, a new array each call, inputs left alone; at every worker count,
and with another thread calling the same ops at the same time.

Most tests lower the size from which the parts path is taken (and the chunk size), so that small
arrays take it in several parts and chunks; `regions` counts the parallel regions, so a test fails
if the path it checks was not taken.
"""
import threading
import warnings

import numpy as np
import pytest

import gpuconv
from gpuconv.autograd import Add
from gpuconv.ops import activation, cpu_parts

MIN_BYTES = 64 << 10  # the threshold most tests use: 16384 float32 elements
MIN_ELEMENTS = MIN_BYTES // 4


@pytest.fixture(params=[0, 1, 2], ids=lambda n: f"workers{n}")
def workers(request):
    gpuconv.set_cpu_workers(request.param)
    yield request.param
    gpuconv.set_cpu_workers(None)


@pytest.fixture
def regions(monkeypatch):
    """The number of parallel regions (cpu_parts.in_parts calls) run so far, as a list of one."""
    count = [0]
    in_parts = cpu_parts.in_parts

    def counting(function, batch):
        count[0] += 1
        return in_parts(function, batch)

    monkeypatch.setattr(cpu_parts, "in_parts", counting)
    return count


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(cpu_parts, "ELEMENTWISE_MIN_BYTES", MIN_BYTES)
    monkeypatch.setattr(activation, "RELU_MIN_BYTES", MIN_BYTES)
    monkeypatch.setattr(cpu_parts, "ELEMENTWISE_CHUNK_BYTES", 3 * cpu_parts.ELEMENTWISE_BLOCK * 8)


def awkward(shape, dtype, seed=0):
    """Random values with NaNs of both signs and several payloads, infinities and zeros of both
    signs mixed in."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(dtype)
    flat = a.reshape(-1)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0], dtype)
    at = rng.integers(0, flat.size, max(1, flat.size // 10))
    flat[at] = special[rng.integers(0, special.size, at.size)]
    if dtype in (np.float32, np.float64):  # NaNs with other payloads than the default one
        ints = {4: np.uint32, 8: np.uint64}[a.itemsize]
        exponent = {4: 0x7F800000, 8: 0x7FF0000000000000}[a.itemsize]
        bits = flat.view(ints)
        at = rng.integers(0, flat.size, max(1, flat.size // 20))
        bits[at] = exponent | (bits[at] & ints(0xFFFF)) | ints(1)  # payload != 0: NaN, never inf
        bits[at[::2]] |= ints(1) << ints(8 * a.itemsize - 1)       # half of them negative
    return a


def same_bits(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.flags.c_contiguous
    assert got.tobytes() == want.tobytes()


# shapes around MIN_ELEMENTS: just below, at, just above; batches of 1 and odd ones; sizes that are
# and are not multiples of ELEMENTWISE_BLOCK
SHAPES = [(1, MIN_ELEMENTS - 1), (1, MIN_ELEMENTS), (1, MIN_ELEMENTS + 1), (3, 5461), (3, 5462),
          (7, 3, 29, 31), (16, 4, 16, 16), (33, 5, 11, 13), (MIN_ELEMENTS + 7,)]


def takes_parts(shape, dtype):
    return np.dtype(dtype).itemsize * int(np.prod(shape)) >= MIN_BYTES


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_relu_and_its_backward_give_the_whole_array_bits(shape, dtype, workers, regions, small_threshold):
    x, dy = awkward(shape, dtype, 1), awkward(shape, dtype, 2)
    x_before, dy_before = x.copy(), dy.copy()
    in_parts = takes_parts(shape, dtype)

    y = activation.relu(x)
    same_bits(y, np.maximum(x, 0))
    assert regions[0] == in_parts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # np.where's comparison of NaNs
        want = np.where(x > 0, dy, 0).astype(dtype)
    same_bits(activation.relu_backward(dy, x), want)
    same_bits(activation.relu_backward(dy, y), want)  # by the output, as F.relu calls it
    assert regions[0] == 3 * in_parts
    assert x.tobytes() == x_before.tobytes() and dy.tobytes() == dy_before.tobytes()


def test_other_dtypes_are_refused_as_before(small_threshold, regions):
    x = np.ones(2 * MIN_ELEMENTS, np.float16)
    with pytest.raises(gpuconv.errors.DTypeError):
        activation.relu(x)
    with pytest.raises(gpuconv.errors.DTypeError):
        activation.relu_backward(x, x)
    assert regions[0] == 0


@pytest.mark.parametrize("op", ["relu", "relu_backward", "add"])
def test_arrays_below_the_default_thresholds_run_whole_and_from_them_in_parts(op, regions):
    minimum = activation.RELU_MIN_BYTES if op == "relu" else cpu_parts.ELEMENTWISE_MIN_BYTES
    call = {"relu": activation.relu, "relu_backward": lambda x: activation.relu_backward(x, x),
            "add": lambda x: Add().forward(x, x)}[op]
    elements = minimum // 4
    below = -np.ones(elements - 1, np.float32)
    at = -np.ones((elements // 1024, 1024), np.float32)
    same_bits(call(below), below + below if op == "add" else np.zeros_like(below))
    assert regions[0] == 0
    same_bits(call(at), at + at if op == "add" else np.zeros_like(at))
    assert regions[0] == 1


def test_a_new_array_each_call(small_threshold, regions):
    x = awkward((8, 4, 32, 32), np.float32)
    dy = awkward(x.shape, np.float32, 1)
    with np.errstate(invalid="ignore"):  # inf + -inf
        results = [activation.relu(x), activation.relu(x), activation.relu_backward(dy, x),
                   activation.relu_backward(dy, x), Add().forward(x, dy), Add().forward(x, dy)]
    assert regions[0] == 6
    for i, result in enumerate(results):
        assert not np.shares_memory(result, x) and not np.shares_memory(result, dy)
        for other in results[i + 1:]:
            assert not np.shares_memory(result, other)


def test_non_contiguous_inputs(workers, small_threshold, regions):
    base = awkward((64, 8, 8, 8), np.float32)
    x = base.transpose(0, 2, 3, 1)  # not C-contiguous
    dy = awkward(x.shape, np.float32, 3)
    same_bits(activation.relu(x), np.maximum(x, 0))
    assert regions[0] == 1  # made contiguous first, as before, then in parts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same_bits(activation.relu_backward(dy, x), np.where(x > 0, dy, 0))  # x not contiguous: whole
        assert regions[0] == 1
        dy_strided = awkward((64, 8, 8, 8), np.float32, 4).transpose(0, 2, 3, 1)
        x_contiguous = np.ascontiguousarray(x)
        same_bits(activation.relu_backward(dy_strided, x_contiguous), np.where(x_contiguous > 0, dy_strided, 0))
    assert regions[0] == 2  # dy made contiguous, x contiguous: in parts


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_of_two_float32_arrays_gives_the_same_bits(shape, workers, regions, small_threshold):
    a, b = awkward(shape, np.float32, 5), awkward(shape, np.float32, 6)
    with np.errstate(invalid="ignore", over="ignore"):
        want = a + b
        got = Add().forward(a, b)
    same_bits(got, want)
    assert regions[0] == takes_parts(shape, np.float32)


@pytest.mark.parametrize("chunk_bytes", [3 * cpu_parts.ELEMENTWISE_BLOCK * 4, 1 << 20], ids=["3-block-chunks", "1MiB-chunks"])
def test_add_of_two_nans_keeps_the_payload_a_whole_array_call_keeps(workers, chunk_bytes, monkeypatch):
    """NumPy's SIMD blocks keep a's payload, its one-by-one rest b's: the parts and chunks must not
    move the boundary between the two (a last part of one element, for one, took a's)."""
    monkeypatch.setattr(cpu_parts, "ELEMENTWISE_MIN_BYTES", 1)
    monkeypatch.setattr(cpu_parts, "ELEMENTWISE_CHUNK_BYTES", chunk_bytes)
    for size in (1, 15, 17, 1025, 1039, 2049, 3 * 1024 + 1, 7 * 1024 + 17, MIN_ELEMENTS + 1, 5 * MIN_ELEMENTS + 1041):
        rng = np.random.default_rng(size)
        a = rng.integers(0x7F800001, 0x7FFFFFFF, size, dtype=np.uint32).view(np.float32)
        b = rng.integers(0xFF800001, 0xFFFFFFFF, size, dtype=np.uint32).view(np.float32)
        with np.errstate(invalid="ignore"):  # signalling NaNs among them
            same_bits(Add().forward(a, b), a + b)


def test_add_outside_the_plain_case_is_as_before(small_threshold, regions):
    a = awkward((16, 4, 16, 16), np.float32)
    with np.errstate(invalid="ignore"):  # NaN payloads cast
        a64 = a.astype(np.float64)
    cases = [(a, a[:1]),                                                  # broadcasting
             (a64, a64),                                                  # float64
             (a, a64),                                                    # mixed dtypes
             (a.transpose(0, 2, 3, 1), a.transpose(0, 2, 3, 1)),          # not C-contiguous
             (a, np.float32(2.5))]                                        # a scalar
    for left, right in cases:
        with np.errstate(invalid="ignore"):
            got, want = Add().forward(left, right), left + right
        assert got.dtype == want.dtype and got.strides == want.strides
        assert got.tobytes() == want.tobytes()
    assert regions[0] == 0


def test_tensor_add_and_its_gradient(small_threshold, regions):
    rng = np.random.default_rng(7)
    a = gpuconv.tensor(rng.standard_normal((16, 4, 16, 16)).astype(np.float32), requires_grad=True)
    b = gpuconv.tensor(rng.standard_normal((16, 4, 16, 16)).astype(np.float32), requires_grad=True)
    out = a + b
    assert regions[0] == 1
    same_bits(out.data, a.data + b.data)
    out.sum().backward()
    assert np.array_equal(a.grad, np.ones_like(a.data)) and np.array_equal(b.grad, np.ones_like(b.data))


def test_the_gradients_of_a_tensor_read_twice_are_summed_in_parts(workers, small_threshold, regions):
    """A residual block's input feeds two branches: autograd sums its two gradients, and a large
    float32 sum runs in parts with a + b's bits."""
    rng = np.random.default_rng(8)
    x = gpuconv.tensor(rng.standard_normal((16, 4, 16, 16)).astype(np.float32), requires_grad=True)
    h = x * 1.0  # not a leaf: its gradients meet in autograd's pending sums
    g1, g2 = (rng.standard_normal((16, 4, 16, 16)).astype(np.float32) for _ in range(2))
    out = (h * gpuconv.tensor(g1)).sum() + (h * gpuconv.tensor(g2)).sum()
    regions[0] = 0
    out.backward()
    assert regions[0] == 1  # the sum of h's two gradients (the products and sums run whole)
    same_bits(x.grad, (g1 + g2) * np.float32(1))


def test_the_callers_floating_point_error_handling_holds_in_every_part(workers, small_threshold):
    a = np.ones(4 * MIN_ELEMENTS, np.float32)
    a[-1] = 3e38  # in the last part: a worker's, where there is one
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        Add().forward(a, a)
    with np.errstate(over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Add().forward(a, a)[-1] == np.inf


def test_inside_one_worker_count_block(small_threshold, regions):
    x = awkward((16, 4, 16, 16), np.float32)
    with cpu_parts.one_worker_count():
        same_bits(activation.relu(x), np.maximum(x, 0))
    assert regions[0] == 1


def test_two_threads_at_once_give_the_bits_of_one_alone(small_threshold):
    """Each thread runs relu, its backward and the add in a loop while the other does the same (and
    a third keeps changing the worker count): every result equals the one computed alone."""
    inputs = [(awkward((24, 8, 16, 16), np.float32, seed), awkward((24, 8, 16, 16), np.float32, seed + 10))
              for seed in (1, 2)]

    def results(x, dy):
        with np.errstate(invalid="ignore", over="ignore"):
            return [activation.relu(x).tobytes(), activation.relu_backward(dy, x).tobytes(),
                    Add().forward(x, dy).tobytes()]

    alone = [results(*pair) for pair in inputs]
    stop, failures = threading.Event(), []

    def run(index):
        try:
            for _ in range(30):
                if results(*inputs[index]) != alone[index]:
                    failures.append(f"thread {index}: other bits")
        except BaseException as error:  # noqa: BLE001 - reported by the test
            failures.append(repr(error))

    def change_workers():
        count = 0
        while not stop.is_set():
            gpuconv.set_cpu_workers(count % 3)
            count += 1

    threads = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
    changer = threading.Thread(target=change_workers)
    try:
        changer.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads), "hang"
    finally:
        stop.set()
        changer.join()
        gpuconv.set_cpu_workers(None)
    assert failures == []
