"""DomainBed sweeps: every (dataset, algorithm, test envs, hparams sample,
trial) as one run of `python -m fishr_jax.main --config configs/domainbed.py`.

  python -m experiments.sweep launch --datasets ColoredMNIST PACS \\
      --algorithms ERM Fishr --n_hparams 20 --n_trials 3 \\
      --output_dir runs/sweep --data_dir /data/domainbed \\
      --command_launcher local
  python -m experiments.sweep list --output_dir runs/sweep ...
  python -m experiments.sweep delete_incomplete --output_dir runs/sweep ...
  python -m experiments.collect_results --input_dir runs/sweep

Flags keep DomainBed's names; any --config.X=Y flag goes to every run. A
run's folder is the md5 of its arguments, so launching again skips finished
runs (those with a `done` file) and resumes the unfinished ones from their
last checkpoint. A run whose folder another process holds (its lock) is
"running": no launch starts it again (two sweeps launched at once share the
work) and delete_incomplete keeps it. Each job's output goes to log.txt in
its folder (jobs launched together, --runs_per_program: to the group's
groups/<digest>/log.txt); a launch whose jobs failed exits 1 and lists
their logs. Launchers: `local` (one run
after another), `multi_device` (one run per local GPU at a time, through
CUDA_VISIBLE_DEVICES), `slurm` (submitit's SLURM executor) and
`submitit_local` (submitit's local executor, for trying the SLURM path
without a cluster), `dummy` (print the commands).
"""

import argparse
import hashlib
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from fishr_jax import cli
from fishr_jax import config_checks
from fishr_jax import errors
from fishr_jax import hparams as hparams_lib
from fishr_jax import ranges
from fishr_jax import workdir
from fishr_jax.algorithms import registry
from fishr_jax.data import domainbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "domainbed.py")
LOG = "log.txt"  # each job's output, in its folder
BUSY = errors.WorkdirBusyError.exit_code


def algorithm_name(name: str) -> str:
  """fishr-jax's name for `name`, which may be DomainBed's ("Fishr")."""
  known = {}
  for ours in registry.names():
    known[ours] = known[registry.domainbed_spec(ours).name] = ours
  if name not in known:
    raise errors.ConfigError(f"Unknown algorithm {name!r}; known: "
                             f"{', '.join(sorted(known))}."
                             + config_checks.suggest(name, known))
  return known[name]


def check_dataset(name: str) -> None:
  if name not in domainbed.DATASETS:
    raise errors.ConfigError(
        f"Unknown dataset {name!r}; known: {', '.join(domainbed.DATASETS)}."
        + config_checks.suggest(name, domainbed.DATASETS))


def test_env_sets(num_envs: int, single_test_envs: bool,
                  only: Sequence[int] | None = None) -> list[list[int]]:
  """Each env alone, plus every pair unless single_test_envs (DomainBed's
  leave-one-domain-out selection needs the pairs); `only`: just those envs,
  each alone."""
  if only:
    bad = sorted(e for e in only if not 0 <= e < num_envs)
    if bad:
      raise errors.ConfigError(f"--test_envs {bad}: this dataset's envs are "
                               f"0..{num_envs - 1}.")
    return [[e] for e in only]
  singles = [[i] for i in range(num_envs)]
  if single_test_envs:
    return singles
  return singles + [list(p) for p in itertools.combinations(range(num_envs), 2)]


class Job:
  """One run: its arguments, folder, status and command."""

  def __init__(self, args: dict[str, Any], output_dir: str,
               extra_flags: Sequence[str]):
    self.args = args
    digest = hashlib.md5(json.dumps(args, sort_keys=True).encode()).hexdigest()
    self.output_dir = os.path.join(output_dir, digest)
    self.flags = []  # the run's --config.X=Y flags
    for key, value in args.items():
      if key == "hparams":
        self.flags += [f"--config.hparams.{k}={v}" for k, v in value.items()]
      elif key == "test_envs":
        self.flags.append(f"--config.test_envs=({','.join(map(str, value))},)")
      else:
        self.flags.append(f"--config.{key}={value}")
    self.flags += list(extra_flags)
    self.command = [sys.executable, "-m", "fishr_jax.main", "--config", CONFIG,
                    "--workdir", self.output_dir, *self.flags]

  @property
  def status(self) -> str:
    """done, running (a live process holds its lock), incomplete or not
    launched."""
    if os.path.exists(os.path.join(self.output_dir, "done")):
      return "done"
    if workdir.is_locked(self.output_dir):
      return "running"
    return "incomplete" if os.path.exists(self.output_dir) else "not launched"

  @property
  def log(self) -> str:
    return os.path.join(self.output_dir, LOG)

  def __str__(self) -> str:
    a = self.args
    return (f"{self.status:<13} {a['dataset']:<14} {a['algorithm']:<9} "
            f"test_envs={a['test_envs']} hparams_seed={a['hparams_seed']} "
            f"trial_seed={a['trial_seed']}  {self.output_dir}")


class GroupJob:
  """Jobs launched as one process (main.py --runs) that trains those that
  can share a program as vectorized programs, `runs_per_program` at a
  time; each run keeps its own folder. The group's folder holds runs.json
  and log.txt."""

  def __init__(self, jobs: Sequence[Job], output_dir: str,
               runs_per_program: int):
    self.jobs = list(jobs)
    digest = hashlib.md5(json.dumps(
        [j.output_dir for j in self.jobs]).encode()).hexdigest()
    self.output_dir = os.path.join(output_dir, "groups", digest)
    self.runs_file = os.path.join(self.output_dir, "runs.json")
    self.command = [sys.executable, "-m", "fishr_jax.main", "--config", CONFIG,
                    "--workdir", self.output_dir, "--runs", self.runs_file,
                    f"--runs_per_program={runs_per_program}"]

  def write_runs_file(self) -> None:
    os.makedirs(self.output_dir, exist_ok=True)
    workdir.write_json(self.runs_file, [
        {"workdir": j.output_dir, "flags": j.flags} for j in self.jobs])

  @property
  def status(self) -> str:
    statuses = {j.status for j in self.jobs}
    for status in ("running", "incomplete"):
      if status in statuses:
        return status
    return statuses.pop() if len(statuses) == 1 else "incomplete"

  @property
  def log(self) -> str:
    return os.path.join(self.output_dir, LOG)

  def __str__(self) -> str:
    return f"{self.status:<13} group of {len(self.jobs)} runs  {self.output_dir}"


def group_jobs(jobs: Sequence[Job], runs_per_program: int) -> list[GroupJob]:
  """The jobs, those that can share a program (train_domainbed.program_key)
  `runs_per_program` to a launch (0: all of them)."""
  if runs_per_program < 0:
    raise errors.ConfigError(f"--runs_per_program={runs_per_program}: must "
                             "be >= 0 (0: all the runs that can share one).")
  from fishr_jax import cli  # pylint: disable=g-import-not-at-top
  from fishr_jax import train_domainbed  # pylint: disable=g-import-not-at-top
  by_key: dict[str, list[Job]] = {}
  for job in jobs:
    key = train_domainbed.program_key(cli.config_with_flags(CONFIG, job.flags))
    by_key.setdefault(key, []).append(job)
  groups = []
  for members in by_key.values():
    size = runs_per_program or len(members)
    groups += [GroupJob(members[i:i + size], os.path.dirname(
        members[0].output_dir), runs_per_program)
               for i in range(0, len(members), size)]
  return groups


def _applies(flag: str, algorithm: str, dataset: str) -> bool:
  """Whether --config.X flag `flag` is for a job of `algorithm` on
  `dataset`: a flag of an algorithm's block (--config.fishr.params=all)
  goes to that algorithm's jobs only, a dataset-specific field
  (config_fields.DATASET_FIELDS) to the datasets that read it."""
  field = flag[len("--config."):].split("=")[0].split(".")[0]
  if field in registry.names():
    return field == algorithm
  return config_checks.dataset_reads(dataset, field)


def make_jobs(flags: argparse.Namespace) -> list[Job]:
  hparams = json.loads(flags.hparams) if flags.hparams else {}
  extra = []
  if flags.data_dir:
    extra.append(f"--config.data_dir={flags.data_dir}")
  extra += flags.extra_flags
  jobs = []
  for dataset in flags.datasets:
    check_dataset(dataset)
  names = {k for d in flags.datasets for a in flags.algorithms
           for k in hparams_lib.specs(algorithm_name(a), d)}
  unknown = sorted(set(hparams) - names)
  if unknown:
    raise errors.ConfigError(
        f"--hparams {unknown}: no job's algorithm has them; their hparams: "
        f"{', '.join(sorted(names))}."
        + config_checks.suggest(unknown[0], names))
  for name, value in hparams.items():  # before any job starts
    ranges.check_hparam(name, value, f"--hparams {name}")
  for dataset in flags.datasets:
    num_envs = len(domainbed.DATASETS[dataset].environments)
    for algorithm in flags.algorithms:
      ours = algorithm_name(algorithm)
      for test_envs in test_env_sets(num_envs, flags.single_test_envs,
                                     flags.test_envs):
        for hparams_seed in range(flags.n_hparams_from, flags.n_hparams):
          for trial_seed in range(flags.n_trials):
            args = {"dataset": dataset, "algorithm": ours, "test_envs": test_envs,
                    "hparams_seed": hparams_seed, "trial_seed": trial_seed,
                    "seed": hparams_lib.seed_hash(dataset, ours, test_envs,
                                                  hparams_seed, trial_seed),
                    "holdout_fraction": flags.holdout_fraction}
            if flags.steps is not None:
              args["steps"] = flags.steps
            if flags.checkpoint_freq is not None:
              args["checkpoint_freq"] = flags.checkpoint_freq
            # Each job gets the forced hparams its algorithm has.
            own = {k: v for k, v in hparams.items()
                   if k in hparams_lib.specs(ours, dataset)}
            if own:
              args["hparams"] = own
            jobs.append(Job(args, flags.output_dir,
                            [f for f in extra if _applies(f, ours, dataset)]))
  return jobs


def check_configs(jobs: Sequence[Job]) -> None:
  """Each (dataset, algorithm)'s config checked as its runs would check it,
  before any job starts: a flag that no run can take (--steps -5,
  --holdout_fraction 1.5, a --config.X=Y) is one error, not a failed job
  each. The jobs of one pair differ only in seeds, test envs (in range by
  construction) and sampled hparams (in their ranges by construction)."""
  checked = set()
  for job in jobs:
    pair = (job.args["dataset"], job.args["algorithm"])
    if pair in checked:
      continue
    checked.add(pair)
    config = cli.config_with_flags(CONFIG, job.flags)
    config_checks.check(config)
    config_checks.check_overrides(config, cli.overridden_paths(job.flags))


# ----------------------------------------------------------------- launchers


def run_command(command: Sequence[str], log: str) -> int:
  """Runs one job's command, its output appended to `log`; module-level so
  submitit can pickle it."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, "a") as f:
    return subprocess.run(list(command), stdout=f, stderr=subprocess.STDOUT,
                          check=False).returncode


# The jobs started by this process. Each runs in its own process group, so a
# terminal's Ctrl-C reaches the sweep alone, which hands it on once
# (`_interrupt`); SIGTERM and SIGHUP are handed on too (`_end_jobs_too`).
_STARTED: list[subprocess.Popen] = []


def _run_logged(job: "Job", echo: bool, env: dict | None = None
                ) -> subprocess.Popen:
  """Starts `job`, its output appended to job.log (and echoed if `echo`)."""
  os.makedirs(job.output_dir, exist_ok=True)
  log = open(job.log, "a")  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      job.command, stdout=subprocess.PIPE if echo else log,
      stderr=subprocess.STDOUT, text=True, env=env, process_group=0)
  _STARTED.append(proc)
  if not echo:
    return proc
  try:
    for line in proc.stdout:
      sys.stdout.write(line)
      log.write(line)
  except KeyboardInterrupt:
    _interrupt([proc])
    for line in proc.stdout:  # the job's own last words
      sys.stdout.write(line)
      log.write(line)
    raise
  finally:
    proc.wait()
    log.close()
  return proc


def _end_jobs_too(signum: int, frame: Any) -> None:
  """SIGTERM or SIGHUP (`timeout`, a scheduler, a closed terminal) to the
  sweep: the running jobs get it too, then the sweep ends as the signal
  would have ended it."""
  del frame
  for proc in _STARTED:
    if proc.poll() is None:
      proc.send_signal(signum)
  signal.signal(signum, signal.SIG_DFL)
  os.kill(os.getpid(), signum)


def _interrupt(procs: Sequence[subprocess.Popen]) -> None:
  """Ctrl-C for the running jobs: each gets SIGINT once and is waited for,
  so it ends as an interrupted run does (its folder unlocked, resumable from
  its last checkpoint) before the sweep exits."""
  for proc in procs:
    if proc.poll() is None:
      proc.send_signal(signal.SIGINT)
  for proc in procs:
    try:
      proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def local_launcher(jobs: Sequence[Job]) -> dict[Job, int | None]:
  """One job after another, each output echoed and kept in its log.txt.
  A job that another launcher started meanwhile is skipped (None)."""
  codes = {}
  for i, job in enumerate(jobs):
    if job.status in ("done", "running"):  # e.g. a second sweep's
      print(f"[{i + 1}/{len(jobs)}] skipped, {job.status}: {job.output_dir}",
            flush=True)
      codes[job] = None
      continue
    print(f"[{i + 1}/{len(jobs)}] {shlex.join(job.command)}", flush=True)
    codes[job] = _run_logged(job, echo=True).returncode
  return codes


def multi_device_launcher(jobs: Sequence[Job]) -> dict[Job, int | None]:
  """One job per local GPU (CUDA_VISIBLE_DEVICES) at a time; each output
  goes to its log.txt."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible:
    devices = visible.split(",")
  else:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                         check=False)
    devices = [str(i) for i in range(len(out.stdout.splitlines()))] or ["0"]
  pending, running, codes = list(jobs), {}, {}
  try:
    while pending or running:
      for device in devices:
        job, proc = running.get(device, (None, None))
        if proc is not None and proc.poll() is not None:
          codes[job] = proc.returncode
          del running[device]
        while device not in running and pending:
          job = pending.pop(0)
          if job.status in ("done", "running"):
            codes[job] = None
            continue
          env = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
          print(f"device {device}: {job.output_dir}", flush=True)
          running[device] = (job, _run_logged(job, echo=False, env=env))
      time.sleep(1)
  except KeyboardInterrupt:
    _interrupt([proc for _, proc in running.values()])
    raise
  return codes


def _submitit_launcher(executor_factory: Callable[[str], Any]
                       ) -> Callable[[Sequence[Job]], dict[Job, int | None]]:
  def launch(jobs):
    folder = os.path.join(os.path.commonpath([j.output_dir for j in jobs]),
                          "submitit_logs")
    executor = executor_factory(folder)
    submitted = executor.map_array(run_command, [j.command for j in jobs],
                                   [j.log for j in jobs])
    print(f"Submitted {len(submitted)} jobs; logs in {folder}.", flush=True)
    codes = {}
    for job, handle in zip(jobs, submitted):
      try:
        codes[job] = handle.result()
      except Exception as e:  # pylint: disable=broad-except
        print(f"{job.output_dir}: {type(e).__name__}: {e}", file=sys.stderr)
        codes[job] = -1  # killed by the scheduler (time limit, preemption)
    return codes
  return launch


def _slurm_executor(folder):
  import submitit  # pylint: disable=g-import-not-at-top
  executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
  executor.update_parameters(
      timeout_min=int(os.environ.get("SWEEP_TIMEOUT_MIN", 24 * 60)),
      gpus_per_node=int(os.environ.get("SWEEP_GPUS", 1)),
      slurm_partition=os.environ.get("SWEEP_PARTITION"))
  return executor


def _submitit_local_executor(folder):
  import submitit  # pylint: disable=g-import-not-at-top
  executor = submitit.LocalExecutor(folder=folder)
  executor.update_parameters(timeout_min=60)
  return executor


LAUNCHERS = {
    "local": local_launcher,
    "multi_device": multi_device_launcher,
    "slurm": _submitit_launcher(_slurm_executor),
    "submitit_local": _submitit_launcher(_submitit_local_executor),
    "dummy": lambda jobs: {j: print(shlex.join(j.command)) for j in jobs},
}


# ----------------------------------------------------------------------- CLI


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=["launch", "delete_incomplete", "list"])
  parser.add_argument("--datasets", nargs="+", default=["ColoredMNIST"])
  parser.add_argument("--algorithms", nargs="+", default=["ERM", "Fishr"])
  parser.add_argument("--n_hparams_from", type=int, default=0)
  parser.add_argument("--n_hparams", type=int, default=20)
  parser.add_argument("--n_trials", type=int, default=3)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--checkpoint_freq", type=int, default=None)
  parser.add_argument("--holdout_fraction", type=float, default=0.2)
  parser.add_argument("--single_test_envs", action="store_true")
  parser.add_argument("--test_envs", type=int, nargs="+", default=None,
                      help="Only these test envs, each alone (not DomainBed's "
                      "flag; a quick table).")
  parser.add_argument("--hparams", default="",
                      help='JSON of hparams forced on every run, e.g. \'{"lr": 1e-4}\'.')
  parser.add_argument("--command_launcher", default="local", choices=sorted(LAUNCHERS))
  parser.add_argument("--skip_confirmation", action="store_true")
  parser.add_argument(
      "--runs_per_program", type=int, default=1,
      help="Launch the runs that share shapes (dataset, algorithm, batch "
      "size; they may differ in seeds, test envs and scalar hparams) this "
      "many to a process, trained as one vectorized program (0: all).")
  # Any --config.X=Y flag is passed on to every run (e.g. --config.image_size=64).
  flags, extra = parser.parse_known_args(argv)
  unknown = [a for a in extra if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  flags.extra_flags = extra
  return flags


def _confirm(question: str) -> bool:
  try:
    return input(f"{question} (y/n) ").strip().lower() == "y"
  except EOFError:
    raise errors.ConfigError(
        f"{question}: no answer (stdin is closed); pass --skip_confirmation "
        "to go ahead without asking.") from None


def report(codes: dict[Job, int | None]) -> int:
  """Prints how the launched jobs ended; the sweep's exit code (1 if any
  failed)."""
  runs = lambda jobs: sum(len(getattr(j, "jobs", [j])) for j in jobs)
  failed = [j for j, c in codes.items() if c not in (None, 0, BUSY)]
  busy = [j for j, c in codes.items() if c == BUSY]
  skipped = [j for j, c in codes.items() if c is None]
  print(f"{runs(codes) - runs(failed) - runs(busy) - runs(skipped)} jobs "
        f"finished, {runs(failed)} failed, "
        f"{runs(busy) + runs(skipped)} skipped (done or run by another "
        "process).", flush=True)
  if failed:
    print(f"{runs(failed)} of {runs(codes)} jobs failed; their logs:\n"
          + "\n".join(f"  exit {codes[j]}: {j.log}" for j in failed),
          file=sys.stderr, flush=True)
    return 1
  return 0


def run(flags: argparse.Namespace) -> int:
  jobs = make_jobs(flags)
  for job in jobs:
    print(job)
  counts = {s: sum(j.status == s for j in jobs)
            for s in ("done", "running", "incomplete", "not launched")}
  print(f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
  if flags.command == "launch":
    # Runs that share shapes (same dataset, algorithm, batch size) share
    # their compiled programs through JAX's persistent cache.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(os.path.abspath(flags.output_dir), ".jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    todo = [j for j in jobs if j.status not in ("done", "running")]
    check_configs(todo)
    if not todo or not (flags.skip_confirmation
                        or _confirm(f"Launch {len(todo)} jobs?")):
      return 0
    if flags.runs_per_program != 1:
      todo = group_jobs(todo, flags.runs_per_program)
      for group in todo:
        group.write_runs_file()
      print(f"in {len(todo)} launch(es) of up to "
            f"{flags.runs_per_program or 'all'} runs each", flush=True)
    return report(LAUNCHERS[flags.command_launcher](todo))
  if flags.command == "delete_incomplete":
    todo = [j for j in jobs if j.status == "incomplete"]
    if todo and not (flags.skip_confirmation
                     or _confirm(f"Delete {len(todo)} incomplete runs?")):
      return 0
    deleted = 0
    for job in todo:
      try:  # a run started since the listing keeps its folder
        with workdir.lock(job.output_dir):
          shutil.rmtree(job.output_dir)
        deleted += 1
      except errors.WorkdirBusyError:
        print(f"Kept {job.output_dir}: it is running now.")
    print(f"Deleted {deleted} incomplete runs"
          + (f"; {counts['running']} running ones kept." if counts["running"]
             else "."))
  return 0


def main(argv: Sequence[str] | None = None) -> None:
  flags = parse_flags(sys.argv[1:] if argv is None else argv)
  for signum in (signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. under nohup
      signal.signal(signum, _end_jobs_too)
  run_sweep = cli.reporting_main(
      lambda _: run(flags),
      "launch the same sweep again to go on: finished runs are skipped, the "
      "interrupted ones resume from their last checkpoint.")
  sys.exit(run_sweep([]))


if __name__ == "__main__":
  main()
