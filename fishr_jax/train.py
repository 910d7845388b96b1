"""The trainer: train state, the pure train step, and the loop of one run.

Sections, in order: what a step is; train state; train step; records and
progress; the loop (`train_loop`). An experiment (train_colored_mnist.py,
train_domainbed.py) builds a `Run` (the state at step 0, the jitted step,
its batches, its evaluation) and hands it to `train_loop`; runs trained
together as one program go through vectorized.train_group instead, which
writes each run's folder exactly as this loop would. The loop writes, under
the run's workdir (workdir.RunFolder):

  config.json    the experiment's config
  results.jsonl  one record per `record_every` steps (and the last step):
                 the step, the epoch, every train metric averaged over the
                 steps since the last record (a schedule value such as
                 `penalty_weight`: its value at the record's step),
                 `step_time` (seconds per update, evaluation and compile
                 excluded, as DomainBed times it; a group's covers all its
                 runs), the evaluation ("<split>_acc"), and the run's
                 `hparams` and `args` (DomainBed's record format)
  checkpoints/   orbax checkpoints of the train state (the last two)
  done           written at the end; a finished run is not run again.

A run killed at any point and started again resumes from its last checkpoint
and ends with the same parameters and records (timings aside): batches of
step k depend only on (seed, k), and records past the restored step are
dropped and recomputed.
"""

import contextlib
import dataclasses
import itertools
import math
import sys
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from fishr_jax import algorithms
from fishr_jax import errors
from fishr_jax import fast_paths
from fishr_jax import optimizers
from fishr_jax import parallel
from fishr_jax import workdir as workdir_lib

PyTree = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Record = dict[str, Any]
TrainStep = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]

RECORDS = workdir_lib.RECORDS
DONE = workdir_lib.DONE
CHECKPOINTS = workdir_lib.CHECKPOINTS
CORRUPT_CHECKPOINTS = workdir_lib.CORRUPT_CHECKPOINTS

# ------------------------------------------------------------ what a step is


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What a run's step is built from besides its network: the algorithm's
  frozen Config and its Schedule, the optimizer (an optax call,
  optimizers.py) with the run's learning rate and coupled weight decay, and
  its network's dropout rate (DomainBed's resnet_dropout)."""
  algorithm: Any
  schedule: algorithms.Schedule
  lr: float
  weight_decay: float = 0.0
  dropout_rate: float = 0.0
  optimizer: str = optimizers.ADAM


# (a run's StepSpec, the mesh) -> its algorithm, over its network.
AlgorithmFactory = Callable[[StepSpec, jax.sharding.Mesh],
                            algorithms.Algorithm]


# --------------------------------------------------------------- train state


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  `rng` stays fixed; a step that needs randomness derives its key with
  jax.random.fold_in(rng, step), so a run can resume from any step.
  """
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  alg_state: PyTree
  rng: jax.Array


# fold_in(state.rng, step) keys the steps; this one, past any step, keys the
# algorithm's own networks' initialization.
_OWN_NETWORKS = 2**31 - 1


def create_train_state(rng: jax.Array, params: PyTree,
                       algorithm: algorithms.Algorithm,
                       tx: optax.GradientTransformation,
                       batch: Batch) -> TrainState:
  """Step 0: fresh optimizer and algorithm state for `params` (and the
  algorithm's own networks' parameters, from a key of their own)."""
  if algorithm.init_params is not None:
    params = algorithm.init_params(jax.random.fold_in(rng, _OWN_NETWORKS),
                                   params, batch)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=algorithm.fresh_optimizer(tx, params),
                    alg_state=algorithm.init_state(params, batch), rng=rng)


# ---------------------------------------------------------------- train step


def make_train_step(algorithm: algorithms.Algorithm,
                    tx: optax.GradientTransformation,
                    schedule: algorithms.Schedule) -> TrainStep:
  """The pure train step (jit it): the optimizer reset when the penalty
  switches on (if scheduled), then the algorithm's update (by default one
  gradient step of its loss with `tx`; base.py)."""
  update = algorithm.step_update()

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    opt_state = state.opt_state
    if schedule.reset_optimizer_at_anneal:
      # DomainBed builds a fresh Adam when the full penalty weight switches on.
      reset = schedule.resets_optimizer(state.step)
      opt_state = jax.tree.map(lambda new, old: jnp.where(reset, new, old),
                               algorithm.fresh_optimizer(tx, state.params),
                               opt_state)
    params, opt_state, alg_state, metrics = update(
        tx, state.params, opt_state, state.alg_state, batch, state.step,
        step_rng)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, alg_state=alg_state)
    return new_state, metrics

  return train_step


def jit_train_step(train_step: TrainStep, mesh: jax.sharding.Mesh,
                   xla_cpu_dot_fusion: bool = True,
                   donate: bool = True) -> TrainStep:
  """`train_step` jitted for `mesh` (state replicated on it), with the
  CPU dot fusion where it is safe (fast_paths.jit);
  `donate` reuses the old state's buffers."""
  platform = mesh.devices.flat[0].platform
  return fast_paths.jit(train_step, platform, xla_cpu_dot_fusion,
                        donate_argnums=0 if donate else (),
                        out_shardings=parallel.replicated(mesh))


# ------------------------------------------------------ records and progress

# Metrics that are schedule values, not per-batch measurements: a record
# holds their value at its step, not their mean over the window.
SCHEDULE_METRICS = ("penalty_weight",)


def itstime(step: int, every: int, steps: int) -> bool:
  """Whether a periodic action (every `every` steps, and at the last of
  `steps`) happens after `step`."""
  return step % every == 0 or step == steps - 1


def window_means(values: list[Metrics], lane: int | None = None
                 ) -> dict[str, float]:
  """Each metric over the steps since the last record (host values): its
  mean, or its last value for SCHEDULE_METRICS. `lane`: that run's part of
  a group's stacked metrics."""
  pick = (lambda v: v) if lane is None else (lambda v: v[lane])
  return {k: float(pick(values[-1][k])) if k in SCHEDULE_METRICS
          else float(np.mean([float(pick(m[k])) for m in values]))
          for k in values[0]}


_all_finite = jax.jit(lambda tree: jnp.all(jnp.stack(
    [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
     if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.bool_(True)])))


def divergence(means: dict[str, float], params: PyTree) -> str | None:
  """What is non-finite at a record (a metric, the parameters), or None."""
  bad = [f"{k}={v}" for k, v in means.items() if not math.isfinite(v)]
  if not bool(_all_finite(params)):
    bad.append("non-finite parameters")
  return ", ".join(bad) or None


def diverged_message(name: str, step: int, what: str,
                     folder: workdir_lib.RunFolder) -> str:
  return (f"{name} diverged by step {step}: {what}. Not marked done; its "
          f"last good checkpoint ({folder.latest_checkpoint_step()} steps "
          f"trained) is in {folder.checkpoints}. Try a lower learning rate "
          "or penalty weight.")


def format_record(record: Record, steps: int, eta_s: float | None) -> str:
  """One printed line: step, loss terms and accuracies, the landscapes'
  distances (the records hold every diagnostic), ETA."""
  skip = ("step", "epoch", "hparams", "args", "step_time")
  shown = lambda k: k not in skip and (
      not k.startswith("landscape/")
      or k.endswith(("/hessian_distance", "/fishr_distance")))
  parts = [f"step {record['step']:>{len(str(steps))}d}/{steps}"]
  parts += [f"{k} {v:.4g}" for k, v in record.items()
            if shown(k) and isinstance(v, (int, float))]
  parts.append(f"{1.0 / max(record['step_time'], 1e-9):.1f} steps/s")
  if eta_s is not None:
    parts.append(f"eta {_duration(eta_s)}")
  return "  ".join(parts)


def _duration(seconds: float) -> str:
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
  """Where a run stands, for a person: on a terminal a tqdm bar with rate
  and ETA; elsewhere a line with the ETA at least every `every_s` seconds
  (and the record lines). Only the primary process prints.

  The ETA counts from `start()` (after the compile). Once a record is
  written it is the steps left times the last record's `step_time` plus the
  records left (one every `record_every` steps) times the mean time of a
  record: whatever of the elapsed time the updates do not explain (its
  evaluation, writes, checkpoint). So a run that evaluates at step 0 is not
  estimated as if every step evaluated."""

  def __init__(self, name: str, steps: int, start_step: int,
               record_every: int, every_s: float = 30.0):
    self.name, self.steps, self.every_s = name, steps, every_s
    self.record_every = record_every
    self.update_s, self.records, self.last_record = 0.0, 0, start_step - 1
    self.step_time: float | None = None
    self.per_record = 0.0
    self.primary = parallel.is_primary()
    self.interactive = self.primary and sys.stderr.isatty()
    self.bar = tqdm.tqdm(total=steps, initial=start_step, unit="step",
                         desc=name or None, disable=not self.interactive,
                         dynamic_ncols=True)
    self.prefix = f"{name}: " if name else ""
    self.start_step = start_step
    self.started = self.last_line = time.time()

  def say(self, text: str) -> None:
    if self.primary:
      self.bar.write(self.prefix + text)
      sys.stdout.flush()

  def start(self) -> None:
    self.started = self.last_line = time.time()

  def eta(self, step: int) -> float | None:
    """Seconds left after `step`; None after the last step."""
    if step + 1 >= self.steps:
      return None
    steps_left = self.steps - step - 1
    if self.step_time is None:  # no record yet
      elapsed = time.time() - self.started
      return elapsed / (step + 1 - self.start_step) * steps_left
    last = self.steps - 1
    records_left = (last // self.record_every - step // self.record_every
                    + (last % self.record_every != 0))
    return self.step_time * steps_left + self.per_record * records_left

  def update(self, step: int) -> None:
    """After `step`: the bar, or a line if `every_s` have passed."""
    self.bar.update()
    now = time.time()
    if not self.interactive and now - self.last_line >= self.every_s:
      self.say(f"step {step + 1}/{self.steps}  eta "
               f"{_duration(self.eta(step) or 0.0)}")

  def record(self, record: Record, name: str = "") -> None:
    """A record's line (`name`: the run's, in a group, whose runs share a
    record's step and step_time)."""
    step = record["step"]
    if step != self.last_record:
      self.step_time = record["step_time"]
      self.update_s += self.step_time * (step - self.last_record)
      self.records += 1
      self.last_record = step
      self.per_record = max(time.time() - self.started - self.update_s,
                            0.0) / self.records
    line = format_record(record, self.steps, self.eta(step))
    if self.primary:
      self.bar.write((f"{name}: " if name else self.prefix) + line)
      sys.stdout.flush()
    self.last_line = time.time()

  def close(self) -> None:
    self.bar.close()


class UpdateClock:
  """Seconds per update over a record's window: wall time from `restart` to
  the last update's end, less what `paused` covers (an evaluation before
  the update). A record's evaluation, its writes and the compile fall
  outside it, as in DomainBed's `step_time`."""

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self.start, self.excluded, self.updates = time.perf_counter(), 0.0, 0

  @contextlib.contextmanager
  def paused(self, state: PyTree) -> Iterator[None]:
    """Time in this context is not counted (the updates that compute
    `state` are finished first, so they are)."""
    jax.block_until_ready(state)
    start = time.perf_counter()
    yield
    self.excluded += time.perf_counter() - start

  def per_update(self, state: PyTree) -> float:
    """Seconds per update since `restart`, once `state` is computed."""
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - self.start - self.excluded
    return elapsed / max(self.updates, 1)


def compile_step(train_step: Callable, state: PyTree, batch: Batch,
                 progress: Progress) -> None:
  """Compiles a jitted step for (state, batch) before the first update (a
  cached compile is not redone), so that neither the step's time nor the
  ETA counts it."""
  if hasattr(train_step, "lower"):
    progress.say("compiling the train step...")
    train_step.lower(state, batch).compile()


# ----------------------------------------------------------------- the loop


@dataclasses.dataclass
class Run:
  """One training run, as `train_loop` takes it.

  state: the train state at step 0 (replicated on the mesh), also the
    template a checkpoint is restored into.
  train_step: the jitted step (None for a member of a vectorized group).
  batches: start_step -> iterator of the step's (sharded) batches (None for
    a member of a vectorized group).
  evaluate: params -> {"<split>_acc": float, ...}.
  evaluate_before_update: True (Colored MNIST, as the IRM script): a record
    evaluates the parameters the step's forward pass sees; False
    (DomainBed): the parameters after the step's update.
  epoch: step -> its epoch, as DomainBed records it (step / steps per
    epoch).
  fields: what every record carries besides its numbers (hparams, args).
  checkpoint_every: steps between checkpoints, a multiple of record_every
    (None: at every record); the last step always saves one.
  block_each_step: wait for each step before the next
    (parallel.must_block_each_step).
  diagnose: params -> {"landscape/...": float, ...} (landscape.py), added
    to the records every `diagnostics_every` steps (a multiple of
    record_every; 0: never) and at the last step.
  """
  workdir: str
  config_json: str
  steps: int
  record_every: int
  state: TrainState
  train_step: TrainStep | None
  batches: Callable[[int], Iterator[Batch]] | None
  evaluate: Callable[[PyTree], dict[str, float]]
  evaluate_before_update: bool = False
  epoch: Callable[[int], float] = float
  fields: dict[str, Any] = dataclasses.field(default_factory=dict)
  checkpoint_every: int | None = None
  block_each_step: bool = False
  name: str = ""  # shown on the progress bar
  diagnose: Callable[[PyTree], dict[str, float]] | None = None
  diagnostics_every: int = 0

  def __post_init__(self):
    if self.record_every < 1 or self.checkpoint_every_step % self.record_every:
      raise ValueError(
          f"record_every={self.record_every} must be >= 1 and divide "
          f"checkpoint_every={self.checkpoint_every}.")
    if self.diagnostics_every % self.record_every or (
        self.diagnostics_every and self.diagnose is None):
      raise ValueError(
          f"diagnostics_every={self.diagnostics_every} must be a multiple "
          f"of record_every={self.record_every}, with a `diagnose`.")

  @property
  def checkpoint_every_step(self) -> int:
    return self.checkpoint_every or self.record_every

  def recorded_steps(self, start_step: int) -> list[int]:
    """The steps before `start_step` that have a record."""
    return [s for s in range(start_step)
            if itstime(s, self.record_every, self.steps)]

  def folder(self) -> workdir_lib.RunFolder:
    return workdir_lib.RunFolder(self.workdir, self.config_json)


def measure(run: Run, step: int, params: PyTree) -> dict[str, float]:
  """What the record at `step` holds of `params`: run.evaluate's, and
  run.diagnose's at its steps."""
  values = run.evaluate(params)
  if run.diagnostics_every and itstime(step, run.diagnostics_every,
                                       run.steps):
    values = {**values, **run.diagnose(params)}
  return values


def train_loop(run: Run, progress_every_s: float = 30.0) -> list[Record]:
  """Trains (or resumes, or skips when done) one run; returns its records.

  The run's folder is locked for the whole call. A run resumes from its
  newest readable checkpoint, only with the config it was made with. A
  non-finite loss term or parameter at a record stops the run
  (errors.DivergedError): that record is kept, no checkpoint or `done` is
  written after it. Metrics stay on the device between records (dispatch
  stays asynchronous).
  """
  folder = run.folder()
  with folder.lock():
    finished = folder.finished_records(run.recorded_steps(run.steps))
    if finished is not None:
      return finished
    state, records = folder.resume(run.state, run.recorded_steps)
    start_step = int(state.step)
    if start_step >= run.steps:
      return nothing_left(folder, records)
    progress = Progress(run.name, run.steps, start_step, run.record_every,
                        progress_every_s)
    batches = run.batches(start_step)
    first = next(batches)
    compile_step(run.train_step, state, first, progress)
    progress.start()
    clock, window = UpdateClock(), []
    for step, batch in zip(range(start_step, run.steps),
                           itertools.chain([first], batches)):
      record_now = itstime(step, run.record_every, run.steps)
      if record_now and run.evaluate_before_update:
        with clock.paused(state):
          accs = measure(run, step, state.params)
      state, metrics = run.train_step(state, batch)
      if run.block_each_step:
        jax.block_until_ready(state)
      window.append(metrics)
      clock.updates += 1
      progress.update(step)
      if not record_now:
        continue
      step_time = clock.per_update(state)
      if not run.evaluate_before_update:
        accs = measure(run, step, state.params)
      means = window_means(jax.device_get(window))
      record = {"step": step, "epoch": run.epoch(step), **means,
                "step_time": step_time, **accs, **run.fields}
      folder.append(record)
      records.append(record)
      diverged = divergence(means, state.params)
      if diverged:
        message = diverged_message(run.name or run.workdir, step, diverged,
                                   folder)
        folder.close()
        raise errors.DivergedError(message)
      if itstime(step, run.checkpoint_every_step, run.steps):
        folder.save(step + 1, state)  # before its line: the run goes on
      progress.record(record)
      clock.restart()
      window = []
    progress.close()
    folder.mark_done()
  return records


def nothing_left(folder: workdir_lib.RunFolder, records: list[Record]
                 ) -> list[Record]:
  """A run whose checkpoint is at its last step (its `done` was lost):
  marked done, with a message."""
  if parallel.is_primary():
    print(f"{folder.path}: its checkpoint is at the last step, so nothing is "
          "left to train; marking it done. Pass --fresh to train it again.",
          flush=True)
  folder.mark_done()
  return records
