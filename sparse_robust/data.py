"""Datasets as in-memory numpy arrays, IDX files, resumable batching and augmentation.

Sources: local IDX files (MNIST, Fashion-MNIST) and TensorFlow Datasets (MNIST, Fashion-MNIST,
CIFAR-10). Nothing is ever downloaded unless the caller passes `download=True`.
"""

import dataclasses
import functools
import gzip
import importlib.util
import logging
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging

from sparse_robust.checks import check_int

DATASET_NAMES = ("mnist", "fashion_mnist", "cifar10")
SOURCES = ("auto", "idx", "tfds")
_IDX_DATASETS = ("mnist", "fashion_mnist")
_DEFAULT_IDX_DIRS = {
    "mnist": "/usr/share/datasets/mnist",
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_NUM_CLASSES = 10  # all supported datasets have ten classes
_TF_INSTALL_HINT = "pip install sparse_robust[tf]"

# IDX type code -> big-endian numpy dtype (the format stores every number big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """Missing or corrupt data; the message names the file and how to get the data."""


# --------------------------------------------------------------------------------------------
# IDX files


def _open(path, mode):
    return gzip.open(path, mode) if os.fspath(path).endswith(".gz") else open(path, mode)


def read_idx(path) -> np.ndarray:
    """Reads an IDX file (gzip-compressed when `path` ends in `.gz`) into a native-endian array."""
    try:
        with _open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise DataError(f"IDX file not found: {path}") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip stream ({e})") from e

    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (magic {data[:4].hex()!r}, expected 0000TTNN)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(
            f"{path}: unknown IDX type code 0x{type_code:02x}; "
            f"known codes: {sorted(hex(c) for c in _IDX_DTYPES)}"
        )
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, expected {header_size})")
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        raise DataError(
            f"{path}: IDX payload is {actual} bytes, expected {expected} bytes for shape {dims} "
            f"({'truncated' if actual < expected else 'trailing bytes'})"
        )
    array = np.frombuffer(data, dtype, offset=header_size).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path, array) -> None:
    """Writes `array` as an IDX file (gzip-compressed when `path` ends in `.gz`)."""
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(
            f"array: dtype {array.dtype} cannot be stored in IDX; allowed: "
            f"{sorted(str(d) for d in codes)}"
        )
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"array: ndim {array.ndim} cannot be stored in IDX; allowed: 1..255")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with _open(path, "wb") as f:
        f.write(header + array.astype(_IDX_DTYPES[code]).tobytes())


# --------------------------------------------------------------------------------------------
# Dataset container


@dataclasses.dataclass(frozen=True, eq=False)  # eq on numpy arrays is ambiguous
class Dataset:
    """Train/validation/test splits in memory.

    Images are float32 in [0, 1], NHWC `(N, H, W, C)` or `(N, H*W*C)` when flattened; labels are
    int32 in [0, num_classes).
    """

    name: str
    num_classes: int
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def __post_init__(self):
        for split in ("train", "val", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != np.float32 or labels.dtype != np.int32:
                raise ValueError(
                    f"{split}: images must be float32 and labels int32, got "
                    f"{images.dtype} and {labels.dtype}"
                )
            if labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{split}: {images.shape[0]} images but labels of shape {labels.shape}"
                )
            if images.shape[1:] != self.train_images.shape[1:]:
                raise ValueError(
                    f"{split}: example shape {images.shape[1:]} differs from train "
                    f"{self.train_images.shape[1:]}"
                )

    @property
    def image_shape(self) -> tuple:
        """Shape of one example as stored: `(H, W, C)`, or `(H*W*C,)` when flattened."""
        return self.train_images.shape[1:]

    @property
    def num_train(self) -> int:
        return self.train_images.shape[0]

    @property
    def num_val(self) -> int:
        return self.val_images.shape[0]

    @property
    def num_test(self) -> int:
        return self.test_images.shape[0]


def _to_float_images(images: np.ndarray, flatten: bool) -> np.ndarray:
    """uint8 NHWC -> float32 in [0, 1], optionally flattened to (N, H*W*C)."""
    images = images.astype(np.float32) / np.float32(255)
    return images.reshape(len(images), np.prod(images.shape[1:])) if flatten else images


def _make_dataset(name, train, test, *, validation_size, train_limit, flatten) -> Dataset:
    """Splits raw uint8 (images, labels) into train/val/test: val = first `validation_size`."""
    (train_x, train_y), (test_x, test_y) = train, test
    if not 0 <= validation_size < len(train_x):
        raise ValueError(
            f"validation_size={validation_size} is invalid: the {name} training set has "
            f"{len(train_x)} images and some must remain for training; allowed values: "
            f"0..{len(train_x) - 1}"
        )
    stop = None if train_limit is None else validation_size + train_limit
    return Dataset(
        name=name,
        num_classes=_NUM_CLASSES,
        train_images=_to_float_images(train_x[validation_size:stop], flatten),
        train_labels=train_y[validation_size:stop].astype(np.int32),
        val_images=_to_float_images(train_x[:validation_size], flatten),
        val_labels=train_y[:validation_size].astype(np.int32),
        test_images=_to_float_images(test_x, flatten),
        test_labels=test_y.astype(np.int32),
    )


# --------------------------------------------------------------------------------------------
# Sources


def _how_to_get(name: str, idx_dir) -> str:
    """Instructions listing every way to obtain dataset `name`."""
    ways = []
    if name in _IDX_DATASETS:
        files = ", ".join(f"{f}[.gz]" for pair in _IDX_FILES.values() for f in pair)
        ways.append(f"put the IDX files ({files}) in {idx_dir} and use source='idx'")
        if name == "fashion_mnist":
            ways.append(
                "on Debian/Ubuntu: `apt-get install dataset-fashion-mnist` "
                f"(installs them in {_DEFAULT_IDX_DIRS['fashion_mnist']})"
            )
    ways.append(
        f"with network access: load_dataset({name!r}, source='tfds', download=True) "
        f"(preparing needs TensorFlow: `{_TF_INSTALL_HINT}`)"
    )
    return "To get it: " + "; or ".join(ways) + "."


def _find_idx_file(directory, stem):
    """Path of `stem` or `stem.gz` in `directory`, or None."""
    for candidate in (os.path.join(directory, stem), os.path.join(directory, stem + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _idx_files_present(directory) -> bool:
    return all(
        _find_idx_file(directory, stem) for pair in _IDX_FILES.values() for stem in pair
    )


def _load_idx_split(name, directory, split):
    """(uint8 NHWC images, labels) of one split from the IDX files in `directory`."""
    stems = _IDX_FILES[split]
    paths = [_find_idx_file(directory, stem) for stem in stems]
    for stem, path in zip(stems, paths):
        if path is None:
            raise DataError(
                f"{name}: IDX file {os.path.join(directory, stem)}[.gz] not found. "
                + _how_to_get(name, directory)
            )
    images_path, labels_path = paths
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images of shape (N, H, W), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected 1-D labels, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has "
            f"{len(labels)} labels"
        )
    if labels.size and not 0 <= labels.min() <= labels.max() < _NUM_CLASSES:
        raise DataError(f"{labels_path}: labels outside [0, {_NUM_CLASSES})")
    return images[..., None], labels


def _tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _read_tfds_split(builder, split):
    """(uint8 NHWC images, labels) of one split of a prepared tfds dataset."""
    try:
        # ArrayRecord/Parquet datasets are read by tfds with numpy alone, without TensorFlow.
        source = builder.as_data_source(split=split)
    except NotImplementedError:
        # Prepared as TFRecord (the tfds default): only tf.data can read it.
        if not _tensorflow_installed():
            raise DataError(
                f"{builder.name} in {builder.data_dir} is stored as TFRecord, which needs "
                f"TensorFlow to read: `{_TF_INSTALL_HINT}` (or prepare it with "
                "file_format='array_record')."
            ) from None
        import tensorflow_datasets as tfds

        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        return np.asarray(arrays["image"]), np.asarray(arrays["label"])
    # One batched read: about 2.5x faster than reading item by item.
    records = source.__getitems__(range(len(source)))
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([r["label"] for r in records])
    return images, labels


def _load_tfds(name, data_dir, download):
    """Train and test (images, labels) through tfds; downloads only when `download` is True."""
    import tensorflow_datasets as tfds  # slow import: only for this source

    # tfds logs a warning for each version folder it finds without metadata; the DataError
    # below says in one line what is missing and how to get it. The absl logger's own level is
    # restored as it was (usually unset): restoring absl's verbosity would pin it at WARNING and
    # hide every later INFO record from handlers set below it.
    absl_logger = absl_logging.get_absl_logger()
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    finally:
        absl_logger.setLevel(level)
    if not prepared:
        if not download:
            raise DataError(
                f"{name} is not prepared in the tfds data_dir {builder.data_dir}. "
                + _how_to_get(name, data_dir or _DEFAULT_IDX_DIRS.get(name))
            )
        # Check before downloading: tfds encodes the images with TensorFlow while preparing.
        if not _tensorflow_installed():
            raise DataError(
                f"Preparing {name} with tfds needs TensorFlow: `{_TF_INSTALL_HINT}`."
            )
        # ArrayRecord so that the prepared data can be read later without TensorFlow.
        builder.download_and_prepare(file_format="array_record")
    return _read_tfds_split(builder, "train"), _read_tfds_split(builder, "test")


def _resolve_source(name, source, data_dir):
    """The concrete source ("idx" or "tfds") for `source`, after checking what exists."""
    if source == "idx" and name not in _IDX_DATASETS:
        raise ValueError(
            f"source: 'idx' not available for {name!r}; allowed: 'auto', 'tfds'"
        )
    if source != "auto":
        return source
    if name not in _IDX_DATASETS:
        return "tfds"
    idx_dir = data_dir or _DEFAULT_IDX_DIRS[name]
    return "idx" if _idx_files_present(idx_dir) else "tfds"


def load_dataset(
    name: str,
    *,
    source: str = "auto",
    data_dir=None,
    validation_size: int = 10_000,
    flatten: bool = False,
    download: bool = False,
    train_limit=None,
) -> Dataset:
    """Loads `name` into memory; validation = the first `validation_size` training examples.

    `source`: "idx" reads IDX files from `data_dir` (default: /usr/share/datasets/<name>);
    "tfds" reads a prepared tfds dataset from the tfds `data_dir`; "auto" uses the IDX files when
    all four are present, else tfds. A dataset that is missing raises `DataError` with
    instructions; nothing is downloaded unless `download=True`. `train_limit` keeps only the first
    `train_limit` training examples that remain after the validation split.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"name: {name!r} unknown; allowed: {DATASET_NAMES}")
    if source not in SOURCES:
        raise ValueError(f"source: {source!r} unknown; allowed: {SOURCES}")
    check_int("validation_size", validation_size, 0)
    if train_limit is not None:
        check_int("train_limit", train_limit, 1)

    resolved = _resolve_source(name, source, data_dir)
    if resolved == "idx":
        idx_dir = data_dir or _DEFAULT_IDX_DIRS[name]
        train = _load_idx_split(name, idx_dir, "train")
        test = _load_idx_split(name, idx_dir, "test")
    else:
        train, test = _load_tfds(name, data_dir, download)
    return _make_dataset(
        name, train, test, validation_size=validation_size, train_limit=train_limit,
        flatten=flatten,
    )


def make_synthetic(
    seed: int,
    *,
    num_train: int = 512,
    num_val: int = 128,
    num_test: int = 256,
    image_shape=(8, 8, 1),
    num_classes: int = 10,
    noise: float = 0.1,
    flatten: bool = False,
) -> Dataset:
    """A small learnable problem: per-class prototype images in [0, 1] plus Gaussian noise.

    Deterministic in `seed`; every split draws from the same prototypes.
    """
    for arg, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        check_int(arg, value, 0)
    check_int("num_classes", num_classes, 2)
    if len(image_shape) != 3 or any(not isinstance(d, int) or d < 1 for d in image_shape):
        raise ValueError(f"image_shape: {image_shape!r} must be (H, W, C) of positive ints")
    if noise < 0:
        raise ValueError(f"noise: {noise!r} must be >= 0")

    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.0, 1.0, size=(num_classes, *image_shape))

    def draw(n):
        labels = rng.integers(0, num_classes, size=n)
        images = prototypes[labels] + noise * rng.standard_normal((n, *image_shape))
        images = np.clip(images, 0.0, 1.0).astype(np.float32)
        if flatten:
            images = images.reshape(n, np.prod(image_shape))
        return images, labels.astype(np.int32)

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = map(draw, (num_train, num_val, num_test))
    return Dataset("synthetic", num_classes, train_x, train_y, val_x, val_y, test_x, test_y)


# --------------------------------------------------------------------------------------------
# Batching and augmentation


@functools.partial(jax.jit, static_argnums=2)
def _epoch_permutation(key, epoch, num_examples):
    """The example order of `epoch`: a permutation drawn from `fold_in(key, epoch)`."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def batch_indices(key, num_examples: int, batch_size: int, start_step: int, num_steps: int):
    """Example indices of steps [start_step, start_step + num_steps): int32 [num_steps, batch_size].

    Step s is in epoch e = s // spe (spe = num_examples // batch_size; the remainder of each epoch
    is dropped) and takes rows [(s % spe) * batch_size, (s % spe + 1) * batch_size) of
    `jax.random.permutation(jax.random.fold_in(key, e), num_examples)`, so any range of steps can
    be recomputed exactly when resuming. `key` is a typed (`jax.random.key`) or raw uint32 key.
    """
    for arg, value, low in (
        ("num_examples", num_examples, 1),
        ("batch_size", batch_size, 1),
        ("start_step", start_step, 0),
        ("num_steps", num_steps, 0),
    ):
        check_int(arg, value, low)
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size: {batch_size} exceeds num_examples {num_examples}; allowed: "
            f"1..{num_examples}"
        )
    if num_steps == 0:
        return np.zeros((0, batch_size), np.int32)
    steps_per_epoch = num_examples // batch_size
    steps = np.arange(start_step, start_step + num_steps)
    epochs = steps // steps_per_epoch
    first_epoch = epochs[0]
    # One permutation per epoch touched (not per step); one compilation per num_examples.
    perms = np.stack(
        [
            np.asarray(_epoch_permutation(key, epoch, int(num_examples)))
            for epoch in range(first_epoch, epochs[-1] + 1)
        ]
    )
    rows = (steps % steps_per_epoch)[:, None] * batch_size + np.arange(batch_size)
    return perms[(epochs - first_epoch)[:, None], rows].astype(np.int32)


def augment_crop_flip(key, images, padding: int = 4):
    """Per-example random crop after zero padding by `padding`, then random horizontal flip.

    `images` is NHWC; returns an array of the same shape and dtype. Jittable (`padding` static).
    """
    if images.ndim != 4:
        raise ValueError(f"images: shape {images.shape} must be NHWC (4-D)")
    check_int("padding", padding, 0)
    n, height, width, channels = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def crop_flip(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(crop_flip)(padded, offsets, flips)
