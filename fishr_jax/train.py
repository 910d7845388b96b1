"""The one trainer: train state, the pure train step, checkpoints, records,
and the loop every experiment trains through, for one run or a group of
runs trained together (vectorized.py).

Sections, in order: optimizer; train state; train step; checkpoints and
records; the loop (`train_loop`). An experiment (train_colored_mnist.py,
train_domainbed.py) builds a `Run` (the state at step 0, the jitted step,
its batches, its evaluation) and hands it to `train_loop`, which writes,
under the run's workdir:

  config.json    the experiment's config
  results.jsonl  one record per `record_every` steps (and the last step):
                 the step, the epoch, every train metric averaged over the
                 steps since the last record, `step_time` (seconds per step
                 of the program that trains it: a group's covers all its
                 runs), the evaluation
                 ("<split>_acc"), and the run's `hparams` and `args`
                 (DomainBed's record format)
  checkpoints/   orbax checkpoints of the train state (the last two)
  done           written at the end; a finished run is not run again.

A run killed at any point and started again resumes from its last checkpoint
and ends with the same parameters and records (timings aside): batches of
step k depend only on (seed, k), and records past the restored step are
dropped and recomputed.
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from fishr_jax import algorithms
from fishr_jax import errors
from fishr_jax import fast_paths
from fishr_jax import parallel
from fishr_jax import workdir as workdir_lib

PyTree = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Record = dict[str, Any]
TrainStep = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]

RECORDS = "results.jsonl"
DONE = "done"
CHECKPOINTS = "checkpoints"

# ----------------------------------------------------------------- optimizer


def make_optimizer(lr: float, weight_decay: float = 0.0
                   ) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, weight_decay): the decay is COUPLED (added to the
  gradient before Adam's moments), hence add_decayed_weights before
  scale_by_adam and not adamw."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.scale(-lr),
  )


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


def create_train_state(rng: jax.Array, params: PyTree,
                       algorithm: algorithms.Algorithm,
                       tx: optax.GradientTransformation,
                       batch: Batch) -> TrainState:
  """Step 0: fresh optimizer and algorithm state for `params`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params),
                    alg_state=algorithm.init_state(params, batch), rng=rng)


# ---------------------------------------------------------------- train step


def make_train_step(algorithm: algorithms.Algorithm,
                    tx: optax.GradientTransformation,
                    schedule: algorithms.Schedule) -> TrainStep:
  """The pure train step (jit it): gradient of the algorithm's loss, the
  optimizer reset when the penalty switches on (if scheduled), the update.
  """
  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    grads, (alg_state, metrics) = jax.grad(algorithm.loss_fn, has_aux=True)(
        state.params, state.alg_state, batch, state.step, step_rng)
    opt_state = state.opt_state
    if schedule.reset_optimizer_at_anneal:
      # DomainBed builds a fresh Adam when the full penalty weight switches on.
      reset = schedule.resets_optimizer(state.step)
      opt_state = jax.tree.map(lambda new, old: jnp.where(reset, new, old),
                               tx.init(state.params), opt_state)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state, alg_state=alg_state)
    return new_state, metrics

  return train_step


def jit_train_step(train_step: TrainStep, mesh: jax.sharding.Mesh,
                   xla_cpu_dot_fusion: bool = True,
                   donate: bool = True) -> TrainStep:
  """`train_step` jitted for `mesh` (state replicated on it), with the
  compiler options of its backend (fast_paths.cpu_compiler_options);
  `donate` reuses the old state's buffers."""
  platform = mesh.devices.flat[0].platform
  return jax.jit(train_step, donate_argnums=0 if donate else (),
                 out_shardings=parallel.replicated(mesh),
                 compiler_options=fast_paths.cpu_compiler_options(
                     platform, xla_cpu_dot_fusion))


# -------------------------------------------------- checkpoints and records

# Config fields a resume may change: where and how fast the step runs, not
# what it computes.
MAY_CHANGE_ON_RESUME = ("num_devices", "distributed", "worker_count",
                        "eval_batch_size", "xla_cpu_dot_fusion", "group_step")
CORRUPT_CHECKPOINTS = "corrupt_checkpoints"


def _to_saveable(state: TrainState) -> TrainState:
  return state.replace(rng=jax.random.key_data(state.rng))


def checkpoint_manager(directory: str) -> ocp.CheckpointManager:
  """The run's checkpoints (the last two are kept). Every process of a job
  makes it (orbax synchronizes them), whether or not `directory` exists."""
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=2))


def restore_checkpoint(manager: ocp.CheckpointManager, template: TrainState
                       ) -> TrainState | None:
  """The newest readable checkpoint of `manager`, laid out like `template`
  (its shardings too); None if there is none. A checkpoint that cannot be
  read is moved to <workdir>/corrupt_checkpoints/ with a message, and the
  one before it is tried; errors.WorkdirError if none can be read."""
  directory = str(manager.directory)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(template))
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # pylint: disable=broad-except
      _raise_unless_unreadable(e, step, directory)
      aside = os.path.join(os.path.dirname(directory), CORRUPT_CHECKPOINTS,
                           f"{step}-{int(time.time())}")
      if parallel.is_primary():
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        os.rename(os.path.join(directory, str(step)), aside)
      reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
      print(f"warning: the checkpoint of step {step} cannot be read "
            f"({type(e).__name__}: {reason}); moved it to {aside} and "
            "trying the one before.", file=sys.stderr, flush=True)
      manager.reload()
      continue
    return restored.replace(rng=jax.random.wrap_key_data(restored.rng))
  if steps:
    raise errors.WorkdirError(
        f"None of the {len(steps)} checkpoints in {directory} can be read "
        f"(moved to {os.path.join(os.path.dirname(directory), CORRUPT_CHECKPOINTS)}"
        "); run again to start from step 0, or pass --fresh to move the "
        "whole run aside first.")
  return None


# Restore errors that say the checkpoint is fine but this run differs from it
# (or the machine is short of memory): the files stay where they are.
_NOT_CORRUPTION = ("Structure mismatch", "tree structure", "RESOURCE_EXHAUSTED",
                   "out of memory", "shape mismatch", "Shape mismatch")


def _raise_unless_unreadable(error: Exception, step: int,
                             directory: str) -> None:
  if isinstance(error, MemoryError) or any(
      text in str(error) for text in _NOT_CORRUPTION):
    raise errors.WorkdirError(
        f"The checkpoint of step {step} in {directory} does not fit this run "
        f"({type(error).__name__}: {str(error).strip()[:300]}). The code or "
        "the model changed since it was written, or memory ran out; nothing "
        "was moved. Use the code that wrote it, another --workdir, or "
        "--fresh.") from error


def read_records(workdir: str, up_to_step: int | None = None) -> list[Record]:
  """The run's records (those of steps <= up_to_step, if given)."""
  path = os.path.join(workdir, RECORDS)
  if not os.path.exists(path):
    return []
  return [r for r in workdir_lib.read_jsonl(path)
          if up_to_step is None or r["step"] <= up_to_step]


def finished_records(workdir: str) -> list[Record] | None:
  """A finished run's records (it has a `done` file; says so), else None."""
  if not os.path.exists(os.path.join(workdir, DONE)):
    return None
  records = read_records(workdir)
  if not records:
    raise errors.WorkdirError(
        f"{workdir} is marked done but has no records in {RECORDS}; pass "
        "--fresh to move it aside and train it again.")
  print(f"{workdir} is done; pass --fresh to train it again (the old run is "
        "moved aside).", flush=True)
  return records


def _write_records(workdir: str, records: list[Record]) -> None:
  workdir_lib.write_text(os.path.join(workdir, RECORDS),
                         "".join(json.dumps(r) + "\n" for r in records))


def check_same_config(workdir: str, config_json: str) -> None:
  """A run resumes (or is reported done) only with the config it was
  started with; errors.WorkdirError lists the differences."""
  path = os.path.join(workdir, workdir_lib.CONFIG)
  started = any(os.path.exists(os.path.join(workdir, name))
                for name in (RECORDS, CHECKPOINTS, DONE))
  if not (started and os.path.exists(path)):
    return
  with open(path) as f:
    recorded = f.read()
  try:
    changes = workdir_lib.config_changes(recorded, config_json,
                                         MAY_CHANGE_ON_RESUME)
  except json.JSONDecodeError as e:
    raise errors.WorkdirError(
        f"{path} is not valid JSON ({e.msg}), so this run's config is "
        "unknown; pass --fresh to move the run aside and start over.") from e
  if changes:
    raise errors.WorkdirError(
        f"{workdir} holds a run made with another config, so it cannot be "
        f"resumed: {'; '.join(changes)}. Use another --workdir, or pass "
        "--fresh to move the old run aside and start over.")


_all_finite = jax.jit(lambda tree: jnp.all(jnp.stack(
    [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
     if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.bool_(True)])))


def format_record(record: Record, steps: int, eta_s: float | None) -> str:
  """One printed line: step, loss terms and accuracies, ETA."""
  skip = ("step", "epoch", "hparams", "args", "step_time")
  parts = [f"step {record['step']:>{len(str(steps))}d}/{steps}"]
  parts += [f"{k} {v:.4g}" for k, v in record.items()
            if k not in skip and isinstance(v, (int, float))]
  parts.append(f"{1.0 / max(record['step_time'], 1e-9):.1f} steps/s")
  if eta_s is not None:
    parts.append(f"eta {_duration(eta_s)}")
  return "  ".join(parts)


def _duration(seconds: float) -> str:
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ----------------------------------------------------------------- the loop


@dataclasses.dataclass
class Run:
  """One training run, as `train_loop` takes it.

  state: the train state at step 0 (replicated on the mesh), also the
    template a checkpoint is restored into.
  train_step: the jitted step (None for a member of a `Group`).
  batches: start_step -> iterator of the step's (sharded) batches (None for
    a member of a `Group`).
  evaluate: params -> {"<split>_acc": float, ...}.
  evaluate_before_update: True (Colored MNIST, as the IRM script): a record
    evaluates the parameters the step's forward pass sees; False
    (DomainBed): the parameters after the step's update.
  epoch: step -> its epoch, as DomainBed records it (step / steps per
    epoch).
  fields: what every record carries besides its numbers (hparams, args).
  checkpoint_every: steps between checkpoints, a multiple of record_every
    (None: at every record); the last step always saves one.
  announce_compile: print that the first step compiles (False for runs
    that share an already compiled step).
  block_each_step: wait for each step before the next
    (parallel.must_block_each_step).
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
  announce_compile: bool = True
  block_each_step: bool = False
  name: str = ""  # shown on the progress bar

  def __post_init__(self):
    every = self.checkpoint_every or self.record_every
    if self.record_every < 1 or every % self.record_every:
      raise ValueError(
          f"record_every={self.record_every} must be >= 1 and divide "
          f"checkpoint_every={self.checkpoint_every}.")


# (member indices, their states at the start step, the start step) ->
# (the program's state, its jitted step, its batches from the start step).
ProgramFn = Callable[[list[int], list[TrainState], int],
                     tuple[PyTree, TrainStep, Iterator[Batch]]]


@dataclasses.dataclass
class Group:
  """Runs that train as one vectorized program (vectorized.py), each in its
  own folder exactly as if it trained alone (`train_loop`'s files).

  runs: the members. They share `steps`, `record_every`,
    `checkpoint_every`, `evaluate_before_update` and `block_each_step`;
    each one's `state` is its own step-0 state (on one device), the
    template its checkpoints are restored into.
  program: how any of them train together, from one start step; its state,
    batches and metrics have a leading run axis, one index per member
    given, in that order.
  lane: (a pytree of the program's, i) -> the i-th member's part, on the
    device its `evaluate` and `state` use.
  """
  runs: list[Run]
  program: ProgramFn
  lane: Callable[[PyTree, int], PyTree]
  stacked: bool = True  # False: one run's own step (train_loop)

  @classmethod
  def alone(cls, run: Run) -> "Group":
    """`run` trained by its own step, as `train_loop` trains it."""
    if run.train_step is None or run.batches is None:
      raise ValueError(f"{run.workdir}: a run trained alone needs its own "
                       "train_step and batches (a Group member has none).")
    return cls([run], lambda members, states, start: (
        states[0], run.train_step, run.batches(start)),
               lane=lambda tree, i: tree, stacked=False)

  def __post_init__(self):
    folders = [os.path.abspath(run.workdir) for run in self.runs]
    twice = sorted({f for f in folders if folders.count(f) > 1})
    if twice:
      raise errors.ConfigError(f"A group lists these run folders twice: "
                               f"{twice}.")
    shared = ("steps", "record_every", "checkpoint_every",
              "evaluate_before_update", "block_each_step")
    for field in shared:
      if len({getattr(run, field) for run in self.runs}) > 1:
        raise ValueError(f"The runs of a group must share {field}.")


def _mean_metrics(values: list[dict[str, np.ndarray]], lane: int | None
                  ) -> dict[str, float]:
  """Each metric's mean over the steps since the last record (of the run
  at `lane`, None: unstacked)."""
  pick = (lambda v: v) if lane is None else (lambda v: v[lane])
  return {k: float(np.mean([float(pick(m[k])) for m in values]))
          for k in values[0]}


def _divergence(means: dict[str, float], params: PyTree) -> str | None:
  """What is non-finite at a record (a metric, the parameters), or None."""
  bad = [f"{k}={v}" for k, v in means.items() if not math.isfinite(v)]
  if not bool(_all_finite(params)):
    bad.append("non-finite parameters")
  return ", ".join(bad) or None


def train_loop(run: Run, progress_every_s: float = 30.0) -> list[Record]:
  """Trains (or resumes, or skips when done) one run; returns its records.

  The run's folder is locked for the whole call (workdir.lock). A run
  resumes only with the config it was made with. A non-finite loss term or
  parameter at a record stops the run (errors.DivergedError): that record is
  kept, no checkpoint or `done` is written after it.
  Metrics stay on the device between records (dispatch stays asynchronous).
  On a terminal a tqdm bar shows the rate and ETA; elsewhere a line with the
  ETA is printed at every record and at least every `progress_every_s`.
  """
  return train_group(Group.alone(run), progress_every_s)[0]


def train_group(group: Group, progress_every_s: float = 30.0
                ) -> list[list[Record]]:
  """Trains (or resumes, or skips) every run of `group` as one program, as
  `train_loop` trains one; returns each run's records.

  Every run's folder is locked for the whole call. Runs that resume from
  different steps train as one program per start step. A run that diverges
  stops alone (nothing is written for it after that record) while the others
  go on; errors.DivergedError then names it.
  """
  with contextlib.ExitStack() as locks:
    for run in group.runs:
      locks.enter_context(folder_lock(run.workdir))
    return _train_locked(group, progress_every_s)


def folder_lock(workdir: str) -> contextlib.AbstractContextManager:
  """The run folder's lock, held by the process that writes the folder's
  files: process 0 of a multi-process job (all of them train, and orbax
  has every one write its part of a checkpoint); a no-op elsewhere."""
  if parallel.is_primary():
    return workdir_lib.lock(workdir)
  return contextlib.nullcontext()


@dataclasses.dataclass
class _Member:
  """One run's side of the loop: where it starts and what it wrote."""
  run: Run
  manager: ocp.CheckpointManager
  state: TrainState
  start_step: int
  records: list[Record]
  diverged: str | None = None  # the DivergedError's message


def _say(*args, **kwargs) -> None:
  if parallel.is_primary():
    print(*args, **kwargs)


def _write(path: str, text: str) -> None:
  if parallel.is_primary():
    workdir_lib.write_text(path, text)


def _prepare(run: Run) -> _Member | list[Record]:
  """A run's records if it is done (or has nothing left to train), else
  where it starts: its config checked and written, its newest readable
  checkpoint restored, its records past that checkpoint dropped."""
  check_same_config(run.workdir, run.config_json)
  finished = finished_records(run.workdir)
  if finished is not None:
    return finished
  _write(os.path.join(run.workdir, workdir_lib.CONFIG), run.config_json + "\n")
  manager = checkpoint_manager(os.path.join(run.workdir, CHECKPOINTS))
  state, start_step, records = run.state, 0, []
  restored = restore_checkpoint(manager, run.state)
  if restored is not None:
    state = restored  # laid out as run.state (the restore target)
    start_step = int(restored.step)
    records = read_records(run.workdir, start_step - 1)
    _say(f"Resuming {run.workdir} from step {start_step}.", flush=True)
  if parallel.is_primary():
    _write_records(run.workdir, records)  # drop records past the checkpoint
  if start_step >= run.steps:
    _say(f"{run.workdir}: its checkpoint is at the last step ({run.steps}), "
         "so nothing is left to train; marking it done. Pass --fresh to "
         "train it again.", flush=True)
    manager.close()
    _write(os.path.join(run.workdir, DONE), "done\n")
    return records
  return _Member(run, manager, state, start_step, records)


def _train_locked(group: Group, progress_every_s: float
                  ) -> list[list[Record]]:
  results: list[list[Record] | None] = [None] * len(group.runs)
  members: dict[int, _Member] = {}
  by_start: dict[int, list[int]] = {}
  for i, run in enumerate(group.runs):
    prepared = _prepare(run)
    if isinstance(prepared, _Member):
      members[i] = prepared
      by_start.setdefault(prepared.start_step, []).append(i)
    else:
      results[i] = prepared
  for start_step in sorted(by_start):
    _train_members(group, by_start[start_step],
                   [members[i] for i in by_start[start_step]], start_step,
                   progress_every_s)
  for i, member in members.items():
    results[i] = member.records
  diverged = [m.diverged for m in members.values() if m.diverged]
  if diverged:
    raise errors.DivergedError("\n".join(diverged))
  return results


def _program_name(members: list[_Member]) -> str:
  if len(members) == 1:
    return members[0].run.name
  return f"{members[0].run.name} .. {members[-1].run.name} ({len(members)} runs)"


def _train_members(group: Group, indices: list[int], members: list[_Member],
                   start_step: int, progress_every_s: float) -> None:
  """Trains `members` (group.runs[indices]) from `start_step` as one
  program, writing each one's records, checkpoints and `done`."""
  primary = parallel.is_primary()
  first = members[0].run
  steps, record_every = first.steps, first.record_every
  checkpoint_every = first.checkpoint_every or record_every
  lanes = list(range(len(members))) if group.stacked else [None]
  lane = lambda tree, k: tree if k is None else group.lane(tree, k)
  state, train_step, batches = group.program(
      indices, [m.state for m in members], start_step)
  name = _program_name(members)
  interactive = primary and sys.stderr.isatty()
  bar = tqdm.tqdm(total=steps, initial=start_step, unit="step",
                  desc=name or None, disable=not interactive,
                  dynamic_ncols=True)
  prefix = f"{name}: " if name else ""
  if first.announce_compile:
    _say(f"{prefix}compiling the train step...", flush=True)

  def run_states() -> list[TrainState | None]:  # each live member's state
    return [None if m.diverged else lane(state, k)
            for k, m in zip(lanes, members)]

  def evaluate(states: list[TrainState | None]) -> list[dict | None]:
    return [None if s is None else m.run.evaluate(s.params)
            for m, s in zip(members, states)]

  pending: list[Metrics] = []
  started = window_start = last_print = time.time()
  for step in range(start_step, steps):
    batch = next(batches)
    record_now = step % record_every == 0 or step == steps - 1
    if record_now and first.evaluate_before_update:
      accs = evaluate(run_states())
    state, metrics = train_step(state, batch)
    if first.block_each_step:
      jax.block_until_ready(state)
    pending.append(metrics)
    bar.update()
    now = time.time()
    eta = (now - started) / (step + 1 - start_step) * (steps - step - 1)
    if not record_now:
      if not interactive and now - last_print >= progress_every_s:
        _say(f"{prefix}step {step + 1}/{steps}  eta {_duration(eta)}",
             flush=True)
        last_print = now
      continue
    states = run_states()
    if not first.evaluate_before_update:
      accs = evaluate(states)
    values = jax.device_get(pending)  # waits for the step: times are real
    step_time = (time.time() - window_start) / len(pending)
    pending, window_start = [], time.time()
    save = step % checkpoint_every == 0 or step == steps - 1
    for k, member, run_accs, run_state in zip(lanes, members, accs, states):
      if member.diverged:
        continue
      run = member.run
      means = _mean_metrics(values, k)
      record = {"step": step, "epoch": run.epoch(step), **means,
                "step_time": step_time, **run_accs, **run.fields}
      member.records.append(record)
      if primary:
        _write_records(run.workdir, member.records)
      diverged = _divergence(means, run_state.params)
      if diverged:
        member.manager.close()
        member.diverged = (
            f"{run.name or run.workdir} diverged by step {step}: {diverged}. "
            "Not marked done; its last good checkpoint "
            f"({member.manager.latest_step() or 0} steps trained) is in "
            f"{member.manager.directory}. Try a lower learning rate or "
            "penalty weight.")
        continue
      if save:  # written before its line is printed (and the run goes on)
        member.manager.save(step + 1, args=ocp.args.StandardSave(
            _to_saveable(run_state)))
        member.manager.wait_until_finished()
      line = format_record(record, steps, eta if step + 1 < steps else None)
      if primary:
        bar.write((f"{run.name}: " if run.name else "") + line)
    last_print = time.time()
    if all(m.diverged for m in members):
      break
  bar.close()
  for member in members:
    if not member.diverged:
      member.manager.close()
      _write(os.path.join(member.run.workdir, DONE), "done\n")
