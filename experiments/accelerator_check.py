"""The checks to run first on a machine with an accelerator, in a few minutes.

  python -m experiments.accelerator_check --output_dir results/accelerator

(--output_dir, --repeats, --warmup, --compute_dtype: the benchmark's flags;
--test_workers N runs the tests on N pytest-xdist workers.)

On whatever backend JAX finds (GPU, TPU, or CPU):
1. the tests that matter there, run on that backend: the Fishr paths
   against the reference math, bfloat16 compute, the official vectors, and
   sharded equality on the fake-device mesh (--tests; pytest's summary
   line is kept);
2. the benchmark's quick rows (experiments/benchmark.py): Colored MNIST's
   full batch, DomainBed's MNIST_CNN, and the ResNet-50 PACS and DomainNet
   heads at 224 px, ERM against Fishr; and K = 1, 4, 10, 20 runs per
   vectorized program for the default Colored MNIST run and MNIST_CNN;
and writes accelerator_check.md and accelerator_check.json, the device
named, after each stage (a check cut short keeps what it measured, marked
partial). `--tiny` shrinks every row (CPU: the test suite runs it so that the
script cannot rot; its numbers mean nothing).
"""

import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags

from experiments import benchmark
from experiments import pytest_output
from fishr_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ("tests/test_penalties.py", "tests/test_fast_paths.py",
         "tests/test_precision.py", "tests/test_reference.py",
         "tests/test_parallel.py", "tests/test_vectorized.py")

_TINY = flags.DEFINE_bool("tiny", False,
                          "Tiny sizes (a CPU smoke run of the script).")
_TESTS = flags.DEFINE_list("tests", list(TESTS),
                           "pytest paths (or node ids) to run; empty: none.")
_TEST_TIMEOUT = flags.DEFINE_integer("test_timeout_s", 240,
                                     "Limit of the pytest run.")
_TEST_WORKERS = flags.DEFINE_integer(
    "test_workers", 1, "pytest-xdist workers sharing the accelerator (each "
    "allocates GPU memory as it needs it rather than 75% up front).")


def run_tests(paths: Sequence[str]) -> dict[str, Any]:
  """pytest on `paths` in a subprocess (the default backend: the
  accelerator); its exit code, summary line, failures and time."""
  if not paths:
    return {"paths": [], "summary": "not run", "exit_code": None,
            "failures": {}}
  command = [sys.executable, "-m", "pytest", "-v", "-rf", "-p",
             "no:cacheprovider", "-m", "not slow and not perf", "-n",
             str(_TEST_WORKERS.value), *paths]
  env = dict(os.environ)
  if _TEST_WORKERS.value > 1:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  start = time.time()
  try:
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                         timeout=_TEST_TIMEOUT.value, env=env)
    output, code = out.stdout, out.returncode
    summary = (output.strip().splitlines() or [""])[-1].strip("= ")
  except subprocess.TimeoutExpired as cut:
    output, code = cut.stdout or "", None
    if isinstance(output, bytes):
      output = output.decode(errors="replace")
    summary = f"timed out after {_TEST_TIMEOUT.value} s"
  return {"paths": list(paths), "summary": summary, "exit_code": code,
          "failures": pytest_output.failures(output),
          "time_s": time.time() - start}


def quick_settings(tiny: bool) -> dict[str, dict[str, Any]]:
  """The benchmark rows this check times (tiny: small enough for CPU)."""
  if tiny:  # the same code paths, two rows, few compiles (ERM and Fishr's
    # closed form: test_benchmark runs fishr_vmap's MNIST_CNN row)
    colored = benchmark.colored_mnist_full_batch(n_per_domain=256, hidden=32)
    cnn = benchmark.domainbed_mnist_cnn(8)
    for setting in (colored, cnn):
      setting["variants"] = ("erm", "fishr_closed_form")
    return {"colored_mnist_full_batch": colored, "domainbed_mnist_cnn": cnn}
  return {name: benchmark.SETTINGS[name]() for name in (
      "colored_mnist_full_batch", "domainbed_mnist_cnn", "resnet50_pacs",
      "resnet50_domainnet")}


def markdown(report: dict[str, Any]) -> str:
  tests = report["tests"]
  return (f"# Accelerator check\n\nDevice: {report['device']}; JAX "
          f"{report['jax']}; {report['wall_time_s']:.0f} s in all"
          f"{' (tiny sizes)' if report['tiny'] else ''}"
          f"{'' if report['complete'] else ' (cut short: partial)'}.\n\n"
          f"Tests ({', '.join(tests['paths']) or 'none'}): "
          f"{tests['summary']}.\n\n"
          + "".join(f"- FAILED {test}{' - ' + reason if reason else ''}\n"
                    for test, reason in tests["failures"].items())
          + ("\n" if tests["failures"] else "")
          + benchmark.markdown(report["benchmark"], report["device"]))


def write_report(tests: dict[str, Any], results: dict[str, Any], done: bool,
                 start: float) -> str:
  """Writes accelerator_check.md and .json as they stand, so that a check
  cut short (a lease's limit, a crash) leaves what it measured."""
  report = {**benchmark.report(dict(results)), "tiny": _TINY.value,
            "tests": tests, "complete": done,
            "wall_time_s": time.time() - start}
  report["benchmark"] = report.pop("results")
  folder = benchmark._OUTPUT_DIR.value  # pylint: disable=protected-access
  os.makedirs(folder, exist_ok=True)
  text = markdown(report)
  with open(os.path.join(folder, "accelerator_check.md"), "w") as f:
    f.write(text)
  with open(os.path.join(folder, "accelerator_check.json"), "w") as f:
    json.dump(report, f, indent=2)
  return text


def main(argv: Sequence[str]) -> None:
  cli.set_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  start = time.time()
  if _TINY.value:  # the benchmark's own flags, shrunk
    flags.FLAGS.image_size, flags.FLAGS.repeats, flags.FLAGS.warmup = 32, 2, 0
  print(f"testing on {benchmark.device_description()} ...", flush=True)
  tests = run_tests(_TESTS.value)
  print(f"tests: {tests['summary']}", flush=True)
  results = {}
  write_report(tests, results, done=False, start=start)
  for name, setting in quick_settings(_TINY.value).items():
    print(f"benchmarking {setting['description']} ...", flush=True)
    results[name] = benchmark.benchmark_setting(setting)
    write_report(tests, results, done=False, start=start)
  print("benchmarking runs per program ...", flush=True)
  if _TINY.value:
    results["runs_per_program"] = benchmark.runs_per_program(
        counts=(1, 2), setups=quick_settings(tiny=True))
  else:
    results["runs_per_program"] = benchmark.runs_per_program()
  print(write_report(tests, results, done=True, start=start))
  if tests["exit_code"] not in (0, None):
    sys.exit(1)


if __name__ == "__main__":
  app.run(cli.reporting_main(main, "nothing was written (the report comes "
                                   "at the end); run the same command again."),
          flags_parser=cli.parse_flags)
