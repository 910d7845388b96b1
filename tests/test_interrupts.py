"""Ctrl-C in every command (issue 19): one line saying what is kept and how
to go on, exit 130, no traceback, and a run folder that is not marked done,
not left locked, and resumes."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from experiments import sweep
from fishr_jax import cli
from fishr_jax import errors
from fishr_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORED = os.path.join(ROOT, "configs", "colored_mnist.py")
DOMAINBED = os.path.join(ROOT, "configs", "domainbed.py")
STEP_10 = r"step +10/"


def _hear_sigint():
  """A child of a shell's background job inherits SIGINT ignored (POSIX:
  asynchronous commands without job control ignore it), and Python then
  never raises KeyboardInterrupt; a terminal's foreground job hears it."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def ctrl_c(command, marker, delay_s=0.0, timeout_s=120,
           signum=signal.SIGINT):
  """Runs `command` in its own process group and sends the group SIGINT, as
  a terminal's Ctrl-C does (or `signum`), once a line of its output matches
  the regular expression `marker` (then after `delay_s`). Returns (exit
  code, output lines)."""
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          start_new_session=True, preexec_fn=_hear_sigint)
  lines, deadline = [], time.time() + timeout_s
  try:
    for line in proc.stdout:
      lines.append(line.rstrip("\n"))
      if re.search(marker, line):
        break
      assert time.time() < deadline, "\n".join(lines)
    time.sleep(delay_s)
    os.killpg(proc.pid, signum)
    rest, _ = proc.communicate(timeout=timeout_s)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  return proc.returncode, lines + rest.splitlines()


def assert_interrupted(code, lines, how_to_go_on):
  text = "\n".join(lines)
  assert code == cli.INTERRUPTED, text
  assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
  assert lines[-1] == f"Interrupted; {how_to_go_on}", text


def assert_resumable(folder):
  """Not marked done and not left locked."""
  assert not os.path.exists(os.path.join(folder, workdir_lib.DONE))
  with workdir_lib.lock(str(folder)):
    pass


def test_reporting_main_ends_ctrl_c_and_user_errors_in_one_line(
    capsys, monkeypatch):
  monkeypatch.setattr(os, "_exit", sys.exit)  # not the test's own process
  def interrupted(argv):
    raise KeyboardInterrupt

  def mistaken(argv):
    raise errors.ConfigError("lr must be > 0; got -1.")

  with pytest.raises(SystemExit) as exit_:
    cli.reporting_main(interrupted, "nothing was written.")([])
  assert exit_.value.code == cli.INTERRUPTED
  assert capsys.readouterr().err == "Interrupted; nothing was written.\n"
  with pytest.raises(SystemExit) as exit_:
    cli.reporting_main(mistaken, "unused")([])
  assert exit_.value.code == errors.ConfigError.exit_code
  assert capsys.readouterr().err == "error: lr must be > 0; got -1.\n"


def test_ctrl_c_in_a_colored_mnist_run(tmp_path):
  workdir = tmp_path / "run"
  code, lines = ctrl_c(
      [sys.executable, "-m", "fishr_jax.main", "--config", COLORED,
       "--workdir", str(workdir), "--config.restarts=1",
       "--config.steps=100000", "--config.log_every=10"], marker=STEP_10)
  assert_interrupted(code, lines,
                     f"run the same command again to resume {workdir}.")
  assert_resumable(workdir / "restart_0")


def _sweep_flags(output_dir, data_dir):
  return ["--algorithms", "ERM", "--test_envs", "2", "--n_hparams", "1",
          "--n_trials", "1", "--output_dir", str(output_dir),
          "--data_dir", data_dir, "--config.digits_source=idx",
          "--steps", "100000"]


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_hands_it_to_the_job_and_waits(tmp_path,
                                                         tiny_mnist_dir):
  flags = _sweep_flags(tmp_path / "sweep", tiny_mnist_dir)
  code, lines = ctrl_c([sys.executable, "-m", "experiments.sweep", "launch",
                        "--skip_confirmation", *flags], marker=r"step +0/")
  assert_interrupted(code, lines, (
      "launch the same sweep again to go on: finished runs are skipped, the "
      "interrupted ones resume from their last checkpoint."))
  # The job had its own Ctrl-C, once, and ended before the sweep did.
  (job,) = sweep.make_jobs(sweep.parse_flags(["list", *flags]))
  assert_resumable(job.output_dir)
  with open(job.log) as f:
    assert f.read().strip().splitlines()[-1] == (
        f"Interrupted; run the same command again to resume {job.output_dir}.")
  assert job.status == "incomplete"


@pytest.mark.slow
@pytest.mark.parametrize("command, marker, how_to_go_on", [
    (["experiments.colored_mnist_table", "--restarts=1", "--algorithms=erm"],
     STEP_10, "run the same command again to go on: finished runs are "
     "kept."),
    (["experiments.landscape", "--restarts=1", "--algorithms=erm",
      "--steps=100000"], STEP_10, "run the same command again to go on: "
     "finished runs are kept."),
    (["experiments.benchmark", "colored_mnist_full_batch"], "benchmarking",
     "nothing was written (the tables come at the end); run the same command "
     "again."),
])
def test_ctrl_c_in_an_experiment(tmp_path, command, marker, how_to_go_on):
  module, *flags = command
  code, lines = ctrl_c([sys.executable, "-m", module, *flags,
                        f"--output_dir={tmp_path / 'out'}"], marker=marker,
                       delay_s=3.0)
  assert_interrupted(code, lines, how_to_go_on)


@pytest.mark.slow
def test_sigterm_to_a_sweep_ends_its_job_too(tmp_path, tiny_mnist_dir):
  """`timeout`'s or a scheduler's SIGTERM to the sweep's process group: the
  job, in a process group of its own, must not train on as an orphan."""
  flags = _sweep_flags(tmp_path / "sweep", tiny_mnist_dir)
  code, lines = ctrl_c([sys.executable, "-m", "experiments.sweep", "launch",
                        "--skip_confirmation", *flags], marker=r"step +0/",
                       signum=signal.SIGTERM)
  assert code == -signal.SIGTERM, "\n".join(lines)
  (job,) = sweep.make_jobs(sweep.parse_flags(["list", *flags]))
  deadline = time.time() + 60
  while workdir_lib.is_locked(job.output_dir):
    assert time.time() < deadline, "the job outlived its sweep"
    time.sleep(0.5)
  assert job.status == "incomplete"
