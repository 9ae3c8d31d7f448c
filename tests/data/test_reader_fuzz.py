"""Property-based fuzzing of the data readers (issue 15, the bad-input suite): whatever the bytes
of a data file, a reader returns data or raises :class:`samkit.data.DataFormatError` (IDX files:
its subclass ``IDXFormatError``; CIFAR: ``UnsafePickleError`` for a pickle that names a global)
with one line that names the file; never another exception type.

The inputs are real files (tests/data_formats.py writes them) with random headers, random
contents, cut short or with bytes flipped, and structures of random types where a reader expects
arrays and lists.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from data_formats import idx_bytes, write_fashion_mnist, write_svhn_mat
from samkit.data import DataFormatError
from samkit.data.cifar import read_cifar_batch
from samkit.data.fashion_mnist import IDXFormatError, load_fashion_mnist, read_idx
from samkit.data.image_folder import load_image
from samkit.data.svhn import read_svhn_mat

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_names_the_file(exc: BaseException, path: Path) -> None:
    text = str(exc)
    assert str(path) in text, text
    assert "\n" not in text.strip(), text


def mutate(data: bytes, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    """``data`` with bytes replaced at ``flips`` (index mod length, new value), then cut short."""
    out = bytearray(data)
    for index, value in flips:
        if out:
            out[index % len(out)] = value
    return bytes(out if cut is None else out[: cut % (len(out) + 1)])


flips = st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=6)
cuts = st.none() | st.integers(0, 2**16)


# --------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST)
# --------------------------------------------------------------------------------------------


def idx_header(type_code: int, dims: list[int]) -> bytes:
    return struct.pack(">HBB", 0, type_code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


@FUZZ
@given(
    type_code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x0A, 0xFF]),
    dims=st.lists(
        st.one_of(st.integers(0, 4), st.sampled_from([28, 2**16, 2**21, 2**22, 2**32 - 1])),
        max_size=5,
    ),
    payload=st.binary(max_size=64),
    compress=st.booleans(),
    cut=cuts,
    flip=flips,
)
@example(
    type_code=8, dims=[0, 0, 28, 2**32 - 1], payload=b"", compress=False, cut=None, flip=[]
)  # no data, past numpy's limit
@example(
    type_code=8, dims=[2**22, 2**21, 2**21], payload=b"", compress=True, cut=None, flip=[]
)  # 2**64 bytes: 0 in int64
def test_read_idx_of_any_header(tmp_path, type_code, dims, payload, compress, cut, flip):
    raw = mutate(idx_header(type_code, dims) + payload, cut, flip)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    try:
        array = read_idx(path)
    except IDXFormatError as exc:
        assert_names_the_file(exc, path)
        return
    assert array.nbytes == len(raw) - 4 - 4 * array.ndim  # the payload, exactly


@FUZZ
@given(data=st.binary(max_size=200), gzip_magic=st.booleans(), suffix=st.sampled_from(["", ".gz"]))
def test_read_idx_of_any_bytes(tmp_path, data, gzip_magic, suffix):
    path = tmp_path / f"y.idx{suffix}"
    path.write_bytes((b"\x1f\x8b" if gzip_magic else b"") + data)
    try:
        read_idx(path, expect_ndim=3, expect_dtype=np.uint8)
    except IDXFormatError as exc:
        assert_names_the_file(exc, path)


@FUZZ
@given(
    which=st.sampled_from(["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]),
    cut=cuts,
    flip=flips,
    recompress=st.booleans(),
)
def test_load_fashion_mnist_with_one_corrupt_file(tmp_path_factory, which, cut, flip, recompress):
    directory = tmp_path_factory.mktemp("fmnist")
    write_fashion_mnist(directory, n_train=8, n_test=4)
    path = directory / which
    data = path.read_bytes()
    if recompress:  # corrupt the IDX content, not the gzip stream
        data = gzip.compress(mutate(gzip.decompress(data), cut, flip))
    else:
        data = mutate(data, cut, flip)
    path.write_bytes(data)
    try:
        images, labels = load_fashion_mnist("train", data_dir=directory)
    except DataFormatError as exc:
        assert str(directory) in str(exc) and "\n" not in str(exc).strip(), str(exc)
        return
    assert images.shape[1:] == (28, 28) and len(images) == len(labels)
    assert int(labels.max()) < 10


def test_an_idx_shape_that_wraps_around_int64_is_truncation(tmp_path):
    # 2**22 * 2**21 * 2**21 = 2**64 is 0 in int64: read as "0 bytes needed", it once matched an
    # empty payload and failed in numpy's reshape without naming the file.
    path = tmp_path / "wrap.idx"
    path.write_bytes(idx_header(0x08, [2**22, 2**21, 2**21]))
    with pytest.raises(IDXFormatError, match="truncated") as info:
        read_idx(path)
    assert_names_the_file(info.value, path)
    assert idx_bytes(np.zeros((2, 3), np.uint8))[3] == 2  # the writer: ndim in byte 3


# --------------------------------------------------------------------------------------------
# CIFAR pickles
# --------------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.binary(max_size=8)
    | st.text(max_size=8)
)
arrays = st.builds(
    lambda dtype, shape: np.zeros(shape, dtype),
    st.sampled_from([np.uint8, np.int8, np.int64, np.float32, np.bool_]),
    st.sampled_from([(0,), (3,), (2, 3072), (2, 3071), (0, 3072), (1, 3, 32, 32)]),
)
values = st.recursive(scalars | arrays, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
keys = st.sampled_from([b"data", b"labels", "data", "labels", b"fine_labels", 1, None, "\ud800"])


@FUZZ
@given(
    obj=st.dictionaries(keys, values, max_size=4) | values,
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
    cut=cuts,
    flip=flips,
)
@example(obj={1: 0, b"x": 1}, protocol=2, cut=None, flip=[])  # keys that do not sort
@example(obj={"\ud800": 0}, protocol=2, cut=None, flip=[])  # a key that is not UTF-8
@example(
    obj={b"data": np.zeros((1, 3072), np.uint8), b"labels": [2**70]}, protocol=2, cut=None, flip=[]
)
def test_read_cifar_batch_of_any_pickle(tmp_path, obj, protocol, cut, flip):
    path = tmp_path / "data_batch_1"
    path.write_bytes(mutate(pickle.dumps(obj, protocol=protocol), cut, flip))
    try:
        images, labels = read_cifar_batch(path, b"labels", 10)
    except DataFormatError as exc:
        assert_names_the_file(exc, path)
        return
    assert images.shape[1:] == (3, 32, 32) and len(images) == len(labels)


@FUZZ
@given(n=st.integers(0, 3), labels=st.lists(scalars, max_size=4), cut=cuts, flip=flips)
def test_read_cifar_batch_of_a_batch_with_odd_labels(tmp_path, n, labels, cut, flip):
    batch = {b"data": np.zeros((n, 3072), np.uint8), b"labels": labels}
    path = tmp_path / "test_batch"
    path.write_bytes(mutate(pickle.dumps(batch, protocol=2), cut, flip))
    try:
        read_cifar_batch(path, b"labels", 10)
    except DataFormatError as exc:
        assert_names_the_file(exc, path)


# --------------------------------------------------------------------------------------------
# SVHN .mat files, image files
# --------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=st.sampled_from([(32, 32, 3, 2), (32, 32, 3, 0), (32, 32, 2), (31, 32, 3, 2), (2,)]),
    dtype=st.sampled_from([np.uint8, np.float64, np.int16]),
    y=st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 20), max_size=3),
    cut=cuts,
)
def test_read_svhn_mat_of_any_variables(tmp_path, shape, dtype, y, cut):
    import scipy.io

    path = tmp_path / "train_32x32.mat"
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"X": np.zeros(shape, dtype), "y": np.asarray(y, np.float64)})
    path.write_bytes(mutate(buffer.getvalue(), cut, []))  # truncation: sizes stay plausible
    try:
        images, labels = read_svhn_mat(path)
    except DataFormatError as exc:
        assert_names_the_file(exc, path)
        return
    assert images.shape[1:] == (3, 32, 32) and len(images) == len(labels)


def test_read_svhn_mat_of_a_valid_file(tmp_path):
    path = tmp_path / "test_32x32.mat"
    write_svhn_mat(path, 3)
    images, labels = read_svhn_mat(path)
    assert images.shape == (3, 3, 32, 32) and set(labels.tolist()) <= set(range(10))


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)).save(buffer, "PNG")
    return buffer.getvalue()


@FUZZ
@given(cut=cuts, flip=flips, suffix=st.sampled_from([".png", ".jpg", ""]))
def test_load_image_of_any_bytes(tmp_path, png_bytes, cut, flip, suffix):
    path = tmp_path / f"img{suffix}"
    data = mutate(png_bytes, cut, flip)
    assume(data != png_bytes)
    path.write_bytes(data)
    try:
        image = load_image(path)
    except DataFormatError as exc:
        assert_names_the_file(exc, path)
        return
    assert image.ndim == 3 and image.shape[0] == 3
