"""K runs in one jitted program: the train step vmapped over a leading run
axis, so small models fill an accelerator instead of idling it.

Runs train together when they share every shape and every structural
choice: dataset, model, algorithm and its non-numeric options, optimizer,
batch size, number of test envs (`group_key`; DomainBed's `program_key`).
They may differ in their seeds (hence data and initialization) and in every
scalar of their `train.StepSpec`: the learning rate, weight decay, dropout
rate, the schedule's anneal step and weights, and the algorithm's float
options (Fishr's lambda and ema, IRM's lambda, ...). A value every run of the group shares stays a Python constant of the program,
as in a run trained alone; one that differs becomes a (K,) array that each
run's lane of the step reads (`split_hparams`). Each run still gets exactly
the step it would get alone: the same algorithm factory and
`train.make_train_step`, called with its own values (tests/test_vectorized.py:
equal to the runs made one by one, to float32 rounding, on 1 and 2 devices).

On a mesh from `parallel.make_runs_mesh` the runs are split over its run
axis and each run's batch over its data axis. `make_group` makes such runs
a `Group`, trained by one program for all of them ("vmap") or by the
program of one run called for each in turn ("each": faster on CPU).
`train_group` is the loop of a group: train.train_loop's, with each run's
lane of the state, its own records, checkpoints and divergence.
"""

import contextlib
import dataclasses
import itertools
import os
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fishr_jax import errors
from fishr_jax import fast_paths
from fishr_jax import optimizers
from fishr_jax import parallel
from fishr_jax import train
from fishr_jax import workdir as workdir_lib
from fishr_jax.algorithms import base

PyTree = Any
# (stacked states, stacked batches, per-run values) -> (states, metrics).
VectorizedStep = Callable[[train.TrainState, train.Batch, dict[str, jax.Array]],
                          tuple[train.TrainState, train.Metrics]]

# The Schedule's fields a run of a group may set alone (its booleans shape
# the program).
SCHEDULE_SCALARS = ("penalty_anneal_iters", "penalty_warmup_weight",
                    "l2_regularizer_weight")


def scalar_fields(hparams: train.StepSpec) -> dict[str, Any]:
  """Every per-run scalar of `hparams`, by dotted name: the algorithm
  Config's float fields, SCHEDULE_SCALARS and the optimizer's."""
  fields = {f"algorithm.{f.name}": getattr(hparams.algorithm, f.name)
            for f in dataclasses.fields(hparams.algorithm) if f.type is float}
  fields.update({f"schedule.{name}": getattr(hparams.schedule, name)
                 for name in SCHEDULE_SCALARS})
  fields.update(lr=hparams.lr, weight_decay=hparams.weight_decay,
                dropout_rate=hparams.dropout_rate)
  return fields


def with_values(hparams: train.StepSpec, values: dict[str, Any]
                ) -> train.StepSpec:
  """`hparams` with the per-run scalars in `values` (dotted names)."""
  def part(prefix: str) -> dict[str, Any]:
    return {name[len(prefix):]: v for name, v in values.items()
            if name.startswith(prefix)}
  return dataclasses.replace(
      hparams,
      algorithm=dataclasses.replace(hparams.algorithm, **part("algorithm.")),
      schedule=dataclasses.replace(hparams.schedule, **part("schedule.")),
      lr=values.get("lr", hparams.lr),
      weight_decay=values.get("weight_decay", hparams.weight_decay),
      dropout_rate=values.get("dropout_rate", hparams.dropout_rate))


def group_key(hparams: train.StepSpec) -> tuple:
  """What runs trained together must share: every non-scalar field (the
  optimizer too), and which of the algorithm's scalars are zero (a zero may
  shape the program: Fishr keeps no moving average at ema 0;
  base.is_zero). The learning rate's, weight decay's, schedule's and
  dropout rate's zeros shape nothing."""
  scalars = scalar_fields(hparams)

  def fields(prefix: str, obj: Any) -> tuple:
    key = []
    for field in dataclasses.fields(obj):
      name, value = prefix + field.name, getattr(obj, field.name)
      if name not in scalars:
        key.append((name, value))
      elif prefix == "algorithm.":
        key.append((name, value == 0))
    return tuple(key)

  return (type(hparams.algorithm), fields("algorithm.", hparams.algorithm),
          fields("schedule.", hparams.schedule), hparams.optimizer)


def split_hparams(runs: list[train.StepSpec]
                  ) -> tuple[train.StepSpec, dict[str, np.ndarray]]:
  """(what the runs share, {name: (K,) values} of the scalars that differ).
  Raises ValueError unless the runs share a `group_key`."""
  keys = {group_key(h) for h in runs}
  if len(keys) > 1:
    raise ValueError(f"These runs cannot train as one program: they differ in "
                     f"more than scalar hparams ({len(keys)} kinds).")
  fields = [scalar_fields(h) for h in runs]
  varying = {}
  for name, value in fields[0].items():
    column = [f[name] for f in fields]
    if any(v != value for v in column):
      ints = all(isinstance(v, int) and not isinstance(v, bool)
                 for v in column)
      varying[name] = np.asarray(column, np.int32 if ints else np.float32)
  return runs[0], varying


# How a group's runs take each step (config.group_step): "vmap", one program
# for all of them; "each", a program of one run (the same for all: one
# compile) called for each run in turn.
GROUP_STEPS = ("vmap", "each")


def resolve_group_step(group_step: str, platform: str) -> str:
  """config.group_step's "auto": "each" on CPU, where XLA's batched
  operations over several runs are slower than the runs one by one
  (experiments/benchmark.py runs_per_program), "vmap" elsewhere."""
  if group_step == "auto":
    return "each" if platform == "cpu" else "vmap"
  base.check_choices("config", group_step=(group_step, GROUP_STEPS))
  return group_step


def make_train_step(make_algorithm: train.AlgorithmFactory,
                    shared: train.StepSpec, mesh: jax.sharding.Mesh) -> VectorizedStep:
  """The step of K runs on `mesh`: `train.make_train_step` of each run's
  own algorithm and optimizer, built from `shared` and its lane of the
  values that differ, vmapped over the leading run axis of the state, the
  batch and the values (jit it, e.g. with `jit_train_step`; steps.build
  does both)."""

  def one_run(state, batch, values):
    spec = with_values(shared, values)
    tx = optimizers.make(spec.optimizer, spec.lr, spec.weight_decay)
    algorithm = make_algorithm(spec, mesh)
    return train.make_train_step(algorithm, tx, spec.schedule)(state, batch)

  return jax.vmap(one_run)


def jit_train_step(step: VectorizedStep, mesh: jax.sharding.Mesh,
                   xla_cpu_dot_fusion: bool = True) -> VectorizedStep:
  """`step` jitted for a `parallel.make_runs_mesh` mesh: states and metrics
  split over its run axis, the old states' buffers reused."""
  platform = mesh.devices.flat[0].platform
  return fast_paths.jit(step, platform, xla_cpu_dot_fusion, donate_argnums=0,
                        out_shardings=parallel.run_sharding(mesh))


# (member indices, the start step, the program's steps.BuiltStep) -> each
# step's batches of those runs (built.shard of their host batches), from
# the start step.
GroupBatches = Callable[[list[int], int, Any], Iterator[train.Batch]]


def make_group(runs: list[train.Run], build: Callable[[jax.sharding.Mesh], Any],
               varying: dict[str, np.ndarray], num_devices: int,
               batches: GroupBatches, group_step: str = "vmap"
               ) -> "Group":
  """`runs` (each with its own step-0 state on the first device) as a
  Group, reading the values that differ (`split_hparams`) of just the runs
  it trains. `build(mesh)`: the steps.BuiltStep of a program of runs on
  `mesh` (built once per program size). `group_step` "vmap": any K of them
  train as one program on `parallel.make_runs_mesh(K, num_devices)`;
  "each": each run in turn by the program of one run, its batch over all
  the devices."""
  if group_step not in GROUP_STEPS:
    raise ValueError(f"group_step must be one of {GROUP_STEPS}, got "
                     f"{group_step!r}.")
  programs: dict[int, tuple[jax.sharding.Mesh, Any]] = {}

  def program_of(size: int) -> tuple[jax.sharding.Mesh, Any]:
    if size not in programs:
      mesh = parallel.make_runs_mesh(size, num_devices)
      programs[size] = mesh, build(mesh)
    return programs[size]

  def values_of(indices, mesh):
    return {k: jax.device_put(v[np.asarray(indices)],
                              parallel.run_sharding(mesh))
            for k, v in varying.items()}

  def together(indices, states, start_step):
    mesh, built = program_of(len(indices))
    values = values_of(indices, mesh)
    return Program(
        stack(states, mesh), lambda s, b: built.step(s, b, values),
        batches(indices, start_step, built),
        compile=lambda s, b: built.step.lower(s, b, values).compile())

  def in_turn(indices, states, start_step):
    mesh, built = program_of(1)
    values = [values_of([i], mesh) for i in indices]
    block = runs[indices[0]].block_each_step
    iterators = [batches([i], start_step, built) for i in indices]

    def each_step(states, step_batches):
      out = []
      for state, batch, run_values in zip(states, step_batches, values):
        out.append(built.step(state, batch, run_values))
        if block:  # one run's step at a time (parallel.must_block_each_step)
          jax.block_until_ready(out[-1])
      metrics = {k: jnp.concatenate([m[k] for _, m in out]) for k in out[0][1]}
      return tuple(s for s, _ in out), metrics

    step_batches = (tuple(next(it) for it in iterators)
                    for _ in itertools.count())
    return Program(
        tuple(stack([s], mesh) for s in states), each_step, step_batches,
        compile=lambda s, b: built.step.lower(s[0], b[0], values[0]).compile())

  device = jax.devices()[0]  # every mesh's first (parallel.make_runs_mesh)
  if group_step == "vmap":
    lane = lambda tree, i: jax.device_put(unstack(tree, i), device)
  else:
    lane = lambda tree, i: jax.device_put(unstack(tree[i], 0), device)
  return Group(runs, together if group_step == "vmap" else in_turn, lane)


# ----------------------------------------------------------- a group's loop


class Program(NamedTuple):
  """Some of a group's runs, trained together from one start step."""
  state: PyTree  # their states, as the step takes them
  step: Callable[[PyTree, Any], tuple[PyTree, train.Metrics]]
  batches: Iterator[Any]  # each step's batches, from the start step
  compile: Callable[[PyTree, Any], Any]  # (state, batch) -> compiled step


# (member indices, their states at the start step, the start step) -> the
# program that trains them.
ProgramFn = Callable[[list[int], list[train.TrainState], int], Program]


@dataclasses.dataclass
class Group:
  """Runs that train as one vectorized program, each in its own folder
  exactly as if it trained alone (train.train_loop's files).

  runs: the members (train.Runs without train_step or batches). They share
    `steps`, `record_every`, `checkpoint_every`, `evaluate_before_update`
    and `block_each_step`; each one's `state` is its own step-0 state (on
    one device), the template its checkpoints are restored into.
  program: how any of them train together, from one start step; its state,
    batches and metrics have a leading run axis, one index per member
    given, in that order.
  lane: (a pytree of the program's, i) -> the i-th member's part, on the
    device its `evaluate` and `state` use.
  """
  runs: list[train.Run]
  program: ProgramFn
  lane: Callable[[PyTree, int], PyTree]

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


@dataclasses.dataclass
class _Member:
  """One run's side of a group's loop."""
  run: train.Run
  folder: workdir_lib.RunFolder
  state: train.TrainState  # at its start step
  records: list[train.Record]
  diverged: str | None = None  # the DivergedError's message


def train_group(group: Group, progress_every_s: float = 30.0
                ) -> list[list[train.Record]]:
  """Trains (or resumes, or skips) every run of `group`, as train.train_loop
  trains one; returns each run's records.

  Every run's folder is locked for the whole call. Runs that resume from
  different steps train as one program per start step. A run that diverges
  stops alone (nothing is written for it after that record) while the others
  go on; errors.DivergedError then names it.
  """
  folders = [run.folder() for run in group.runs]
  with contextlib.ExitStack() as locks:
    for folder in folders:
      locks.enter_context(folder.lock())
    results = [folder.finished_records(run.recorded_steps(run.steps))
               for run, folder in zip(group.runs, folders)]
    members: dict[int, _Member] = {}
    for i, (run, folder) in enumerate(zip(group.runs, folders)):
      if results[i] is not None:
        continue
      state, records = folder.resume(run.state, run.recorded_steps)
      if int(state.step) >= run.steps:
        results[i] = train.nothing_left(folder, records)
      else:
        members[i] = _Member(run, folder, state, records)
    by_start: dict[int, list[int]] = {}
    for i, member in members.items():
      by_start.setdefault(int(member.state.step), []).append(i)
    for start_step in sorted(by_start):
      indices = by_start[start_step]
      _train_together(group, indices, [members[i] for i in indices],
                      start_step, progress_every_s)
  for i, member in members.items():
    results[i] = member.records
  diverged = [m.diverged for m in members.values() if m.diverged]
  if diverged:
    raise errors.DivergedError("\n".join(diverged))
  return results


def _train_together(group: Group, indices: list[int], members: list[_Member],
                    start_step: int, progress_every_s: float) -> None:
  """Trains `members` (group.runs[indices]) from `start_step` as one
  program, writing each one's records, checkpoints and `done`."""
  first = members[0].run
  steps = first.steps
  program = group.program(indices, [m.state for m in members], start_step)
  name = (first.name if len(members) == 1 else
          f"{first.name} .. {members[-1].run.name} ({len(members)} runs)")
  progress = train.Progress(name, steps, start_step, first.record_every,
                            progress_every_s)
  batches = program.batches
  batch = next(batches)
  progress.say("compiling the train step...")
  program.compile(program.state, batch)
  progress.start()

  def live_states():
    return [None if m.diverged else group.lane(state, k)
            for k, m in enumerate(members)]

  def evaluate(states, step):
    return [None if s is None else train.measure(m.run, step, s.params)
            for m, s in zip(members, states)]

  state, clock, window = program.state, train.UpdateClock(), []
  for step, batch in zip(range(start_step, steps),
                         itertools.chain([batch], batches)):
    record_now = train.itstime(step, first.record_every, steps)
    if record_now and first.evaluate_before_update:
      with clock.paused(state):
        accs = evaluate(live_states(), step)
    state, metrics = program.step(state, batch)
    if first.block_each_step:
      jax.block_until_ready(state)
    window.append(metrics)
    clock.updates += 1
    progress.update(step)
    if not record_now:
      continue
    step_time = clock.per_update(state)
    states = live_states()
    if not first.evaluate_before_update:
      accs = evaluate(states, step)
    values = jax.device_get(window)
    for k, (member, run_accs, run_state) in enumerate(
        zip(members, accs, states)):
      if not member.diverged:
        _record(member, step, train.window_means(values, k), step_time,
                run_accs, run_state, progress)
    clock.restart()
    window = []
    if all(m.diverged for m in members):
      break
  progress.close()
  for member in members:
    if not member.diverged:
      member.folder.mark_done()


def _record(member: _Member, step: int, means: dict[str, float],
            step_time: float, accs: dict[str, float],
            state: train.TrainState, progress: train.Progress) -> None:
  """One member's record at `step`: written, checked, checkpointed."""
  run, folder = member.run, member.folder
  record = {"step": step, "epoch": run.epoch(step), **means,
            "step_time": step_time, **accs, **run.fields}
  folder.append(record)
  member.records.append(record)
  diverged = train.divergence(means, state.params)
  if diverged:
    member.diverged = train.diverged_message(run.name or run.workdir, step,
                                             diverged, folder)
    folder.close()
    return
  if train.itstime(step, run.checkpoint_every_step, run.steps):
    folder.save(step + 1, state)
  progress.record(record, run.name)


def stack(trees: list[PyTree], mesh: jax.sharding.Mesh | None = None
          ) -> PyTree:
  """K pytrees of one shape as one with a leading run axis (keys too), on
  `mesh`'s run axis if given."""
  def stack_leaves(*leaves):
    if jax.dtypes.issubdtype(leaves[0].dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(
          np.stack([np.asarray(jax.random.key_data(x)) for x in leaves]),
          impl=jax.random.key_impl(leaves[0]))
    return np.stack([np.asarray(x) for x in leaves])
  stacked = jax.tree.map(stack_leaves, *trees)
  return stacked if mesh is None else jax.device_put(
      stacked, parallel.run_sharding(mesh))


def unstack(tree: PyTree, index: int) -> PyTree:
  """Run `index`'s part of a pytree with a leading run axis."""
  return jax.tree.map(lambda x: x[index], tree)
