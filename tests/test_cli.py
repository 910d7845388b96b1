"""The command line: keyword flag paths, unknown fields with close matches,
one-line errors with exit codes (fishr_jax/cli.py)."""

import os
import subprocess
import sys

import pytest

from fishr_jax import cli
from fishr_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORED = os.path.join(ROOT, "configs", "colored_mnist.py")
DOMAINBED = os.path.join(ROOT, "configs", "domainbed.py")


def test_keyword_flag_paths_become_their_fields():
  argv = ["prog", "--config.hparams.lambda=100", "--config.fishr.lambda=3",
          "--config.steps=5", "--workdir=lambda"]
  assert cli.keyword_safe_argv(argv) == [
      "prog", "--config.hparams.lambda_=100", "--config.fishr.lambda_=3",
      "--config.steps=5", "--workdir=lambda"]


@pytest.mark.parametrize("flag,hint", [
    # Every algorithm with a lambda_ is a close match; some are named.
    ("--config.lamda=3", ".lambda_ or config."),
    ("--config.fishr.lamda=3", "Did you mean config.fishr.lambda_?"),
    ("--config.restart=3", "Did you mean config.restarts?"),
    ("--config.zzz=3", "has no field 'zzz'. ("),
])
def test_unknown_field_names_the_close_matches(flag, hint):
  message = cli.unknown_override(["prog", flag], COLORED)
  assert hint in message
  assert cli.unknown_override(["prog", "--config.fishr.lambda_=3"],
                              COLORED) is None


def _main(*args, cwd=ROOT):
  return subprocess.run(
      [sys.executable, "-m", "fishr_jax.main", *args], cwd=cwd,
      capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--config", COLORED, "--config.lamda=3"],
     "error: --config.lamda: " + COLORED + " has no field 'lamda'"),
    (["--config", COLORED, "--config.restarts=0"],
     "error: config.restarts=0: must be an integer >= 1."),
    (["--config", DOMAINBED, "--config.hparams.lambda=100",
      "--config.test_envs=(0,1,2)"],
     "error: config.test_envs=(0, 1, 2): leaves no environment to train on"),
    (["--config", DOMAINBED, "--config.steps=abc"],
     "error: flag --config.steps=abc: invalid literal for int()"),
])
def test_bad_flags_end_in_one_line_and_exit_code_2(tmp_path, args, message):
  result = _main(*args, "--workdir", str(tmp_path / "run"))
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip() == message or (
      result.stderr.strip().startswith(message)
      and "\n" not in result.stderr.strip()), result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("module,flag,message", [
    ("colored_mnist_table", "--restarts=0",
     "error: flag --restarts=0: 0 is not a positive integer"),
    ("landscape", "--every=0",
     "error: flag --every=0: 0 is not a positive integer"),
    ("benchmark", "--repeats=0",
     "error: flag --repeats=0: 0 is not a positive integer"),
])
def test_the_experiments_bad_flags_end_in_one_line_and_exit_code_2(
    tmp_path, module, flag, message):
  result = subprocess.run(
      [sys.executable, "-m", f"experiments.{module}", flag,
       f"--output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True,
      text=True, timeout=120)
  assert (result.returncode, result.stderr) == (2, message + "\n")
  assert not (tmp_path / "out").exists()


def test_a_diverged_run_exits_4_without_done_or_results(tmp_path):
  workdir = tmp_path / "run"
  result = _main("--config", COLORED, "--workdir", str(workdir),
                 "--config.lr=1e6", "--config.restarts=1", "--config.steps=51",
                 "--config.hidden_dim=16")
  assert result.returncode == 4, result.stderr
  assert result.stderr.strip().startswith(
      "error: restart 0 diverged by step 50: loss=nan")
  assert not (workdir / "restart_0" / "done").exists()
  assert not (workdir / "results.json").exists()
  # Asked again, it diverges again instead of reporting the broken run.
  assert _main("--config", COLORED, "--workdir", str(workdir),
               "--config.lr=1e6", "--config.restarts=1", "--config.steps=51",
               "--config.hidden_dim=16").returncode == 4


def test_an_unexpected_error_is_one_line_with_its_traceback_logged(
    tmp_path, capsys):
  def boom():
    raise RuntimeError("boom")
  with pytest.raises(SystemExit) as exit_:
    cli.run_reporting_errors(boom, str(tmp_path), verbose=False)
  assert exit_.value.code == 1
  log = tmp_path / cli.ERROR_LOG
  assert capsys.readouterr().err.splitlines() == [
      "error: RuntimeError: boom",
      f"(an unexpected error: its traceback is in {log}; --verbose prints it)"]
  assert "Traceback" in log.read_text() and 'raise RuntimeError("boom")' in (
      log.read_text())
  with pytest.raises(RuntimeError):  # --verbose: the traceback itself
    cli.run_reporting_errors(boom, str(tmp_path), verbose=True)


def test_a_user_error_exits_with_its_code(tmp_path, capsys):
  def busy():
    raise errors.WorkdirBusyError("in use")
  with pytest.raises(SystemExit) as exit_:
    cli.run_reporting_errors(busy, str(tmp_path), verbose=False)
  assert exit_.value.code == 75
  assert capsys.readouterr().err == "error: in use\n"
  assert not (tmp_path / cli.ERROR_LOG).exists()


def test_library_logs_stay_at_warning_unless_verbose():
  from absl import logging  # pylint: disable=g-import-not-at-top
  cli.set_library_logs()
  assert logging.get_verbosity() == logging.WARNING
  cli.set_library_logs(verbose=True)
  assert logging.get_verbosity() == logging.INFO
  cli.set_library_logs()


def test_callbacks_into_a_closed_event_loop_are_not_printed(capfd):
  import gc  # pylint: disable=g-import-not-at-top

  class RaisesWhenCollected:
    def __init__(self, message):
      self.message = message

    def __del__(self):
      raise RuntimeError(self.message)

  try:
    cli.set_library_logs()
    RaisesWhenCollected("Event loop is closed")
    gc.collect()
    assert "Event loop is closed" not in capfd.readouterr().err
    RaisesWhenCollected("another failure")
    gc.collect()
    assert "another failure" in capfd.readouterr().err  # still shown
  finally:
    cli.set_library_logs(verbose=True)
    cli.set_library_logs()
