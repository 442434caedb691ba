"""The IDX file format (LeCun's MNIST format), raw or gzip-compressed.

Layout: two zero bytes, a dtype code, the number of dimensions, then one big-endian int32 per
dimension, then the payload in C order, big-endian. The payload must fill the file exactly: a short
file means a broken download, extra bytes mean it is not the file we think it is.
Compression is detected from the gzip magic bytes (1f 8b), never from the file name, so a renamed
file still loads. Nothing here unpickles anything.
"""
import gzip
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype code -> big-endian NumPy dtype.
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF_KIND = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}


def _describe(source):
    return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)


def decompress_if_gzip(data, name="<bytes>"):
    """`data` unchanged, or gunzipped when it starts with the gzip magic bytes."""
    data = bytes(data)
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{name}: broken gzip data ({exc}); the file is truncated or corrupt, "
                        f"delete it and fetch it again") from None


def read_idx_bytes(source):
    """The uncompressed IDX bytes of a path or of an in-memory (possibly gzipped) buffer."""
    name = _describe(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = Path(source).read_bytes()
    return decompress_if_gzip(data, name)


def parse_idx(data, name="<bytes>"):
    """Decode uncompressed IDX bytes into a read-only array in native byte order.

    `name` only appears in error messages (pass the file path)."""
    data = bytes(data)
    if len(data) < 4:
        raise DataError(f"{name}: {len(data)} bytes is too short for an IDX header (needs at least 4)")
    zero0, zero1, code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES:
        raise DataError(f"{name}: bad IDX magic 0x{data[:4].hex()}; expected 0x0000TTNN with dtype code "
                        f"TT in {{{', '.join(f'{c:02x}' for c in IDX_DTYPES)}}} (images are 0x00000803, "
                        f"labels 0x00000801). Is this an IDX file?")
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares 0 dimensions; expected at least 1")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{name}: truncated IDX header: {ndim} dimensions need {header_size} header "
                        f"bytes, the file has {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in dims):
        raise DataError(f"{name}: negative dimension in IDX header {dims}")
    dtype = IDX_DTYPES[code]
    expected = header_size + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(f"{name}: IDX file {problem}: header says shape {dims} of {dtype.name}, so "
                        f"expected {expected} bytes in all, got {len(data)}")
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(dims)
    if not dtype.isnative and dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
        array.flags.writeable = False
    return array


def read_idx(source):
    """Read an IDX file (path, or bytes already in memory), raw or gzipped. Returns a read-only array."""
    return parse_idx(read_idx_bytes(source), _describe(source))


def encode_idx(array):
    """The IDX bytes (uncompressed) of an array."""
    array = np.asarray(array)
    code = _CODE_OF_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise DataError(f"IDX cannot store dtype {array.dtype}; use one of "
                        f"{', '.join(sorted({dt.name for dt in IDX_DTYPES.values()}))}")
    if not 1 <= array.ndim <= 255:
        raise DataError(f"IDX stores 1 to 255 dimensions; the array has {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()


def write_idx(path, array, compress=None):
    """Write `array` as an IDX file. compress=None gzips when the name ends in .gz.

    Written to a temporary name and renamed, so a crash never leaves a half-written file behind."""
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    data = encode_idx(array)
    if compress:
        data = gzip.compress(data, mtime=0)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
