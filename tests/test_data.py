"""Tests for sparse_robust.data: IDX files, loaders (IDX and tfds, never downloading), batching,
augmentation and the synthetic dataset."""

import functools
import gzip
import importlib.resources
import io
import logging
import os
import struct
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from PIL import Image

from sparse_robust import data

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _idx_bytes(array, type_code=0x08, dtype=">u1"):
    """Independent IDX encoder: magic, big-endian int32 dims, big-endian payload."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}i", *array.shape)
    return header + np.asarray(array, dtype).tobytes()


@pytest.fixture
def forbid_download(monkeypatch):
    """Makes any tfds download attempt fail loudly; returns the list of attempts."""
    attempts = []

    def fail(self, *args, **kwargs):
        attempts.append(self.name)
        raise AssertionError(f"download_and_prepare called for {self.name}")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    return attempts


# ---------------------------------------------------------------------------- IDX format


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5).astype(np.uint8)
    for name, array in (("images", images), ("labels", labels)):
        path = tmp_path / f"{name}-idx{suffix}"
        data.write_idx(path, array)
        back = data.read_idx(path)
        assert back.dtype == np.uint8 and back.shape == array.shape
        np.testing.assert_array_equal(back, array)
        raw = gzip.decompress(path.read_bytes()) if suffix else path.read_bytes()
        assert raw == _idx_bytes(array)


def test_idx_other_dtypes_round_trip(tmp_path):
    for array in (np.arange(-6, 6, dtype=np.int16).reshape(3, 4),
                  np.linspace(-1, 1, 8, dtype=np.float32)):
        path = tmp_path / "x.idx"
        data.write_idx(path, array)
        back = data.read_idx(path)
        assert back.dtype == array.dtype
        np.testing.assert_array_equal(back, array)


def test_read_idx_reads_independently_encoded_file(tmp_path):
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    path = tmp_path / "ints.idx"
    path.write_bytes(_idx_bytes(array, 0x0C, ">i4"))
    np.testing.assert_array_equal(data.read_idx(path), array)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="array"):
        data.write_idx(tmp_path / "x.idx", np.zeros(3, np.uint32))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda raw: raw[:-3], "truncated"),
        (lambda raw: raw + b"\x00\x01", "trailing"),
        (lambda raw: b"\x01\x02" + raw[2:], "not an IDX file"),
        (lambda raw: raw[:2] + b"\x07" + raw[3:], "type code"),
        (lambda raw: raw[:6], "header"),
    ],
)
def test_read_idx_corrupt_files(tmp_path, corrupt, message):
    array = np.zeros((4, 5), np.uint8)
    raw = _idx_bytes(array)
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(corrupt(raw))
    with pytest.raises(data.DataError, match=message) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_reports_expected_and_actual_size(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((4, 5), np.uint8))[:-3]))
    with pytest.raises(data.DataError, match="17 bytes, expected 20") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


# mtime=0: a gzip header holds the time, and a test id that changes between pytest-xdist workers
# stops the run ("Different tests were collected").
@pytest.mark.parametrize(
    "payload", [b"this is not gzip", gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 40, mtime=0)[:-10]],
    ids=["not_gzip", "truncated_gzip"])
def test_read_idx_bad_gzip(tmp_path, payload):
    path = tmp_path / "labels.gz"
    path.write_bytes(payload)
    with pytest.raises(data.DataError, match="gzip") as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.read_idx(tmp_path / "absent.gz")


# ---------------------------------------------------------------------------- IDX loading


def _write_fake_idx_dataset(directory, num_train=30, num_test=8, shape=(4, 5), gz=True):
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, *shape), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, num_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, *shape), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test).astype(np.uint8),
    }
    suffix = ".gz" if gz else ""
    for stem, array in arrays.items():
        data.write_idx(os.path.join(directory, stem + suffix), array)
    return arrays


def test_load_idx_split_limit_and_flatten(tmp_path, forbid_download):
    arrays = _write_fake_idx_dataset(tmp_path, gz=False)
    ds = data.load_dataset(
        "mnist", source="idx", data_dir=str(tmp_path), validation_size=10, train_limit=5,
        flatten=True,
    )
    train_x = arrays["train-images-idx3-ubyte"].reshape(30, -1) / 255.0
    train_y = arrays["train-labels-idx1-ubyte"]
    assert ds.image_shape == (20,) and ds.num_classes == 10
    assert (ds.num_train, ds.num_val, ds.num_test) == (5, 10, 8)
    np.testing.assert_allclose(ds.val_images, train_x[:10], rtol=1e-6)
    np.testing.assert_array_equal(ds.val_labels, train_y[:10])
    np.testing.assert_allclose(ds.train_images, train_x[10:15], rtol=1e-6)
    np.testing.assert_array_equal(ds.train_labels, train_y[10:15])
    np.testing.assert_allclose(
        ds.test_images, arrays["t10k-images-idx3-ubyte"].reshape(8, -1) / 255.0, rtol=1e-6
    )
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    assert not forbid_download


def test_auto_prefers_idx_and_keeps_nhwc(tmp_path, forbid_download):
    arrays = _write_fake_idx_dataset(tmp_path)
    ds = data.load_dataset("mnist", data_dir=str(tmp_path), validation_size=0)
    assert ds.image_shape == (4, 5, 1) and ds.num_val == 0 and ds.num_train == 30
    np.testing.assert_allclose(
        ds.train_images[..., 0], arrays["train-images-idx3-ubyte"] / 255.0, rtol=1e-6
    )


def test_idx_count_mismatch_names_both_files(tmp_path):
    _write_fake_idx_dataset(tmp_path)
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(data.DataError) as info:
        data.load_dataset("mnist", source="idx", data_dir=str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    assert "train-labels-idx1-ubyte.gz" in str(info.value)


def test_idx_missing_file_gives_instructions(tmp_path):
    _write_fake_idx_dataset(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte") as info:
        data.load_dataset("fashion_mnist", source="idx", data_dir=str(tmp_path))
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(name="svhn"), "name"),
        (dict(name="mnist", source="web"), "source"),
        (dict(name="cifar10", source="idx"), "source"),
        (dict(name="mnist", validation_size=-1), "validation_size"),
        (dict(name="mnist", train_limit=0), "train_limit"),
    ],
)
def test_load_dataset_bad_arguments(kwargs, field, forbid_download):
    with pytest.raises(ValueError, match=field):
        data.load_dataset(**kwargs)


def test_validation_size_must_leave_training_examples(tmp_path):
    _write_fake_idx_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"validation_size=30 is invalid.*0\.\.29"):
        data.load_dataset("mnist", source="idx", data_dir=str(tmp_path), validation_size=30)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="Fashion-MNIST IDX files missing")
def test_real_fashion_mnist(forbid_download):
    ds = data.load_dataset("fashion_mnist", source="idx")
    assert (ds.num_train, ds.num_val, ds.num_test) == (50_000, 10_000, 10_000)
    assert ds.image_shape == (28, 28, 1)
    for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert set(np.unique(labels)) == set(range(10))
    with gzip.open(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(60_000, 28, 28)
    np.testing.assert_allclose(ds.val_images[..., 0], raw[:10_000] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.train_images[-1, ..., 0], raw[-1] / 255.0, rtol=1e-6)
    full = data.load_dataset("fashion_mnist", validation_size=0, flatten=True)
    assert full.num_train == 60_000 and full.image_shape == (784,)


# ---------------------------------------------------------------------------- tfds


def test_missing_data_gives_instructions_without_download(tmp_path, forbid_download):
    with pytest.raises(data.DataError) as info:
        data.load_dataset("mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert "IDX" in message and "download=True" in message and str(tmp_path) in message
    with pytest.raises(data.DataError, match="download=True"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert not forbid_download


def test_missing_tfds_data_is_one_error_and_no_tfds_warning(tmp_path, forbid_download, caplog):
    """A version folder without metadata makes tfds log a warning; the DataError alone speaks."""
    (tmp_path / "fashion_mnist" / "3.0.1").mkdir(parents=True)
    absl_level = absl_logging.get_absl_logger().level
    with caplog.at_level(logging.WARNING), pytest.raises(data.DataError, match="not prepared"):
        data.load_dataset("fashion_mnist", source="tfds", data_dir=str(tmp_path))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not forbid_download
    # The quieting is undone: later INFO records (robustness sanity checks) still reach caplog.
    assert absl_logging.get_absl_logger().level == absl_level


def test_download_without_tensorflow_fails_before_downloading(
    tmp_path, forbid_download, monkeypatch
):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # not importable, even if installed
    with pytest.raises(data.DataError, match=r"pip install sparse_robust\[tf\]"):
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=True)
    assert not forbid_download


def _png(image):
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def prepared_mnist(tmp_path_factory):
    """A tiny real tfds "mnist" prepared offline as ArrayRecord, without TensorFlow.

    The generator yields PNG bytes (tfds would encode numpy images with TensorFlow).
    """
    from tensorflow_datasets.image_classification import mnist

    rng = np.random.default_rng(2)
    arrays = {
        "train": (rng.integers(0, 256, (24, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 24)),
        "test": (rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 6)),
    }

    def examples(images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": _png(image), "label": int(label)}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            mnist.MNIST, "_split_generators",
            lambda self, dl_manager: {k: examples(*v) for k, v in arrays.items()},
        )
        # tfds 4.9.10 imports `importlib_resources` (a py<3.9 dependency) when preparing.
        patch.setitem(sys.modules, "importlib_resources", importlib.resources)
        tfds.builder("mnist", data_dir=data_dir).download_and_prepare(file_format="array_record")
    return data_dir, arrays


def _sorted_rows(images):
    flat = images.reshape(len(images), -1)
    return flat[np.lexsort(flat.T[::-1])]


def test_tfds_array_record_reads_without_tensorflow(prepared_mnist, forbid_download, monkeypatch):
    data_dir, arrays = prepared_mnist
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # any TensorFlow import would fail
    ds = data.load_dataset("mnist", data_dir=data_dir, validation_size=4)  # auto: no IDX there
    assert (ds.num_train, ds.num_val, ds.num_test) == (20, 4, 6)
    assert ds.image_shape == (28, 28, 1)
    source = tfds.builder("mnist", data_dir=data_dir).as_data_source(split="train")
    first = [source[i] for i in range(4)]
    np.testing.assert_allclose(ds.val_images, np.stack([r["image"] for r in first]) / 255.0)
    np.testing.assert_array_equal(ds.val_labels, [r["label"] for r in first])
    # Same examples as written (tfds shuffles their order on disk).
    loaded = np.concatenate([ds.val_images, ds.train_images]) * 255.0
    np.testing.assert_allclose(_sorted_rows(loaded), _sorted_rows(arrays["train"][0]), atol=1e-3)
    assert not forbid_download


def test_tfds_tfrecord_without_tensorflow_says_how_to_install(
    prepared_mnist, forbid_download, monkeypatch
):
    def tfrecord_only(self, *args, **kwargs):
        raise NotImplementedError("random access needs ArrayRecord")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", tfrecord_only)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(data.DataError, match=r"pip install sparse_robust\[tf\]"):
        data.load_dataset("mnist", source="tfds", data_dir=prepared_mnist[0])


def test_tfds_cifar10_mock_data(monkeypatch, forbid_download):
    from tensorflow_datasets.testing import mocking

    # mock_data replaces the reader and the data_dir but not is_prepared.
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    # tfds 4.9.10 bug: the mocked batched read `__getitems__` is installed without `self`.
    monkeypatch.setattr(mocking, "_getitems", functools.partial(mocking._getitems, None))
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_dataset("cifar10", source="tfds", validation_size=5)
        source = tfds.builder("cifar10").as_data_source(split="train")
        first = np.stack([source[i]["image"] for i in range(5)])
    assert (ds.num_train, ds.num_val, ds.num_test) == (7, 5, 12)
    assert ds.image_shape == (32, 32, 3)
    assert ds.train_images.min() >= 0.0 and ds.train_images.max() <= 1.0
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
    np.testing.assert_allclose(ds.val_images, first / 255.0, rtol=1e-6)


# ---------------------------------------------------------------------------- synthetic


def test_make_synthetic_is_deterministic_and_learnable():
    a = data.make_synthetic(3, num_train=300, num_val=20, num_test=200)
    b = data.make_synthetic(3, num_train=300, num_val=20, num_test=200)
    c = data.make_synthetic(4, num_train=300, num_val=20, num_test=200)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.train_images.dtype == np.float32 and a.train_labels.dtype == np.int32
    assert a.image_shape == (8, 8, 1) and (a.num_train, a.num_val, a.num_test) == (300, 20, 200)
    assert a.train_images.min() >= 0.0 and a.train_images.max() <= 1.0
    # Nearest class mean (estimated on train) classifies the test split almost perfectly.
    x = a.train_images.reshape(300, -1)
    means = np.stack([x[a.train_labels == k].mean(0) for k in range(10)])
    distances = ((a.test_images.reshape(200, 1, -1) - means[None]) ** 2).sum(-1)
    assert (distances.argmin(1) == a.test_labels).mean() > 0.9


def test_make_synthetic_flatten_and_bad_arguments():
    ds = data.make_synthetic(0, image_shape=(4, 4, 3), flatten=True, num_classes=3)
    assert ds.image_shape == (48,) and ds.train_labels.max() < 3
    with pytest.raises(ValueError, match="num_classes"):
        data.make_synthetic(0, num_classes=1)
    with pytest.raises(ValueError, match="image_shape"):
        data.make_synthetic(0, image_shape=(8, 8))


def test_dataset_rejects_inconsistent_arrays():
    images = np.zeros((4, 2, 2, 1), np.float32)
    labels = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="labels"):
        data.Dataset("x", 10, images, labels, images, labels, images, labels)


# ---------------------------------------------------------------------------- batching


def _reference_batch_indices(key, num_examples, batch_size, start_step, num_steps):
    """Per-step, unjitted transcription of the specification."""
    steps_per_epoch = num_examples // batch_size
    rows = []
    for step in range(start_step, start_step + num_steps):
        epoch, position = divmod(step, steps_per_epoch)
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), num_examples))
        rows.append(perm[position * batch_size:(position + 1) * batch_size])
    return np.stack(rows)


def test_batch_indices_matches_reference_and_resumes():
    key = jax.random.key(0)
    full = data.batch_indices(key, 23, 5, 0, 13)  # 4 steps per epoch, 3 examples dropped
    assert full.shape == (13, 5) and full.dtype == np.int32
    np.testing.assert_array_equal(full, _reference_batch_indices(key, 23, 5, 0, 13))
    for start in (1, 4, 7):
        np.testing.assert_array_equal(data.batch_indices(key, 23, 5, start, 13 - start),
                                      full[start:])


def test_batch_indices_epochs_are_permutation_subsets():
    key = jax.random.key(1)
    idx = data.batch_indices(key, 50, 7, 0, 21)  # 7 steps per epoch -> 3 epochs
    for epoch in idx.reshape(3, -1):
        assert len(np.unique(epoch)) == 49 and epoch.min() >= 0 and epoch.max() < 50
    assert not np.array_equal(idx[:7], idx[7:14])  # a fresh order each epoch


def test_batch_indices_deterministic_and_key_dependent():
    a = data.batch_indices(jax.random.key(5), 40, 8, 3, 6)
    np.testing.assert_array_equal(a, data.batch_indices(jax.random.key(5), 40, 8, 3, 6))
    assert not np.array_equal(a, data.batch_indices(jax.random.key(6), 40, 8, 3, 6))
    raw_key = jax.random.PRNGKey(5)  # legacy uint32 keys work too
    assert data.batch_indices(raw_key, 40, 8, 3, 6).shape == (6, 8)


def test_batch_indices_bad_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="batch_size"):
        data.batch_indices(key, 10, 11, 0, 1)
    with pytest.raises(ValueError, match="start_step"):
        data.batch_indices(key, 10, 2, -1, 1)
    assert data.batch_indices(key, 10, 2, 0, 0).shape == (0, 2)


# ---------------------------------------------------------------------------- augmentation


def _candidates(image, padding):
    """Every crop of the zero-padded image and of its mirror image (numpy reference)."""
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    out = {}
    for mirrored, source in ((False, padded), (True, padded[:, ::-1])):
        for dy in range(2 * padding + 1):
            for dx in range(2 * padding + 1):
                out[(mirrored, dy, dx)] = source[dy:dy + h, dx:dx + w]
    return out


def test_augment_crop_flip_matches_numpy_crops():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.1, 1.0, size=(40, 6, 5, 2)).astype(np.float32)
    out = np.asarray(jax.jit(data.augment_crop_flip, static_argnums=2)(
        jax.random.key(3), images, 2))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0.0 and out.max() <= images.max()
    matches = []
    for image, augmented in zip(images, out):
        found = [k for k, c in _candidates(image, 2).items() if np.array_equal(c, augmented)]
        assert len(found) == 1  # distinct pixel values make the match unique
        matches.append(found[0])
    assert {m[0] for m in matches} == {False, True}  # both flipped and unflipped occur
    assert len({m[1:] for m in matches}) > 5  # offsets vary per example
    np.testing.assert_array_equal(
        out, np.asarray(data.augment_crop_flip(jax.random.key(3), images, 2))
    )


def test_augment_crop_flip_without_padding_only_flips():
    images = np.random.default_rng(1).uniform(size=(16, 3, 4, 1)).astype(np.float32)
    out = np.asarray(data.augment_crop_flip(jax.random.key(0), images, padding=0))
    same = np.all(out == images, axis=(1, 2, 3))
    mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored) and same.any() and mirrored.any()
    with pytest.raises(ValueError, match="images"):
        data.augment_crop_flip(jax.random.key(0), images[0])
