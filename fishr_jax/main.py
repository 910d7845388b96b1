"""Entry point: python -m fishr_jax.main --config configs/X.py --workdir DIR.

With --runs=FILE (DomainBed; what experiments/sweep.py writes for
--runs_per_program): FILE is a JSON list of {"workdir": ..., "flags":
["--config.X=Y", ...]}, one per run; the runs train as vectorized programs
(train_domainbed.train_runs), each in its own workdir, and --workdir holds
the launch's error.log.
"""

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from fishr_jax import cli
from fishr_jax import config_checks
from fishr_jax import errors
from fishr_jax import parallel
from fishr_jax import train_colored_mnist
from fishr_jax import train_domainbed
from fishr_jax import workdir as workdir_lib

# Both experiments build train.Run objects and train through train.train_loop.
TRAINERS = {"colored_mnist": train_colored_mnist.train_and_evaluate,
            "domainbed": train_domainbed.train_and_evaluate}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file (optionally :preset).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for config.json, metrics and results.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show the traceback of every error, not one line, and "
    "the libraries' INFO logs.")
_FRESH = flags.DEFINE_bool(
    "fresh", False, "Move an existing --workdir aside (to WORKDIR.old-TIME) "
    "and start over, instead of resuming or skipping it.")
_RUNS = flags.DEFINE_string(
    "runs", None, "A JSON file of DomainBed runs to train as vectorized "
    "programs (see the module docstring).")
_RUNS_PER_PROGRAM = flags.DEFINE_integer(
    "runs_per_program", 0, "With --runs: runs per program (0: every run "
    "that can share one).")
flags.mark_flags_as_required(["config", "workdir"])


def _train_runs(config_spec: str, path: str, runs_per_program: int) -> None:
  """--runs=path: the DomainBed runs it lists, trained in groups."""
  if cli.overridden_paths(sys.argv):
    raise errors.ConfigError("With --runs, each run's --config.X flags go in "
                             f"{path}; drop them from the command line.")
  try:
    with open(path) as f:
      members = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise errors.ConfigError(f"--runs={path}: cannot read it ({e}).") from e
  if not (isinstance(members, list) and members and all(
      isinstance(m, dict) and isinstance(m.get("workdir"), str)
      and isinstance(m.get("flags"), list) for m in members)):
    raise errors.ConfigError(
        f"--runs={path}: must be a non-empty JSON list of "
        '{"workdir": "...", "flags": ["--config.X=Y", ...]}.')
  configs = []
  for member in members:
    config = cli.config_with_flags(config_spec, member["flags"])
    if config.get("trainer") != "domainbed":
      raise errors.ConfigError(f"--runs trains DomainBed runs; {config_spec} "
                               "is another experiment's config.")
    if config.distributed:
      raise errors.ConfigError(f"{member['workdir']}: --runs trains in one "
                               "process; drop --config.distributed=True.")
    config_checks.check(config)
    config_checks.check_overrides(config, cli.overridden_paths(member["flags"]))
    configs.append(config)
  train_domainbed.train_runs(configs, [m["workdir"] for m in members],
                             runs_per_program)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.set_library_logs(_VERBOSE.value)
  config = cli.load_config_flag(_CONFIG, cli.config_spec(sys.argv))
  workdir = _WORKDIR.value

  def train():
    if _RUNS.value:
      if _FRESH.value:
        raise errors.ConfigError("--fresh with --runs: move the runs' folders "
                                 "aside yourself, or launch them one by one.")
      _train_runs(flags.FLAGS["config"].config_filename, _RUNS.value,
                  _RUNS_PER_PROGRAM.value)
      return
    config_checks.check(config)  # before any data is read
    config_checks.check_overrides(config, cli.overridden_paths(sys.argv))
    if _FRESH.value:
      if config.get("distributed", False):
        raise errors.ConfigError(
            "--fresh with config.distributed: move the old run folder aside "
            "before starting the job (every process would move it).")
      workdir_lib.move_aside(workdir)
    parallel.initialize(config)
    TRAINERS[config.get("trainer", "colored_mnist")](config, workdir)

  cli.run_reporting_errors(train, workdir, _VERBOSE.value)


def run():
  """Console script `fishr-jax`."""
  cli.survive_closed_pipes()
  app.run(main, argv=sys.argv, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
