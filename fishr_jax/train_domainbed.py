"""One DomainBed run: train on the training envs, evaluate every env's in/out
splits every `checkpoint_freq` steps (after that step's update), through
train.train_loop (records, checkpoints, resume, `done`).

Sections: hparams and config; the model; evaluation; the run
(`make_run`, `train_and_evaluate`). Each record is DomainBed's: step, epoch,
every env's in/out accuracy (env{i}_in_acc, env{i}_out_acc), the loss terms,
step_time, hparams, args.
"""

import contextlib
import json
import os
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from fishr_jax import algorithms
from fishr_jax import config_checks
from fishr_jax import errors
from fishr_jax import evaluation
from fishr_jax import hparams as hparams_lib
from fishr_jax import landscape
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax import steps
from fishr_jax import train
from fishr_jax import vectorized
from fishr_jax import workdir as workdir_lib
from fishr_jax.algorithms import registry
from fishr_jax.algorithms import settings
from fishr_jax.data import domainbed

PyTree = Any


# -------------------------------------------------------- hparams and config


def resolve_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """DomainBed's sampled hparams, with every explicitly set override (each
  in its range)."""
  return config_checks.resolved_hparams(config)


def resolve_config(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """The config as the run uses it: references resolved, checkpoint_freq
  the dataset's default when unset."""
  config = config.copy_and_resolve_references()
  if config.checkpoint_freq is None:
    config.checkpoint_freq = domainbed.DATASETS[config.dataset].checkpoint_freq
  return config


def record_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The run's arguments under DomainBed's names (its record's "args")."""
  return {"dataset": config.dataset,
          "algorithm": registry.domainbed_spec(config.algorithm).name,
          "test_envs": list(config.test_envs),
          "hparams_seed": config.hparams_seed, "trial_seed": config.trial_seed,
          "seed": config.seed, "steps": config.steps,
          "checkpoint_freq": config.checkpoint_freq,
          "holdout_fraction": config.holdout_fraction,
          "data_dir": config.data_dir}


# ---------------------------------------------------------------- the model


def make_network(dataset: domainbed.Dataset, hparams: dict[str, Any],
                 config: ml_collections.ConfigDict, rng: jax.Array,
                 sample_x: np.ndarray) -> tuple[nn.Module, PyTree, PyTree]:
  """(module, its frozen collections, initial trainable params) for the
  dataset's backbone."""
  dtype = models.compute_dtype(config.compute_dtype)
  if domainbed.dataset_spec(dataset.name).backbone == "mnist_cnn":
    module = models.MNISTCNN(num_outputs=dataset.num_classes, dtype=dtype)
    return module, {}, models.init_variables(module, rng, sample_x)["params"]
  from fishr_jax import resnet  # pylint: disable=g-import-not-at-top
  depth = 18 if hparams["resnet18"] else 50
  module = resnet.ResNet(depth=depth, num_classes=dataset.num_classes,
                         dropout_rate=hparams["resnet_dropout"], dtype=dtype)
  if config.pretrained_checkpoint:  # ImageNet weights, a new head
    pretrained = resnet.load_torchvision_checkpoint(
        config.pretrained_checkpoint, depth, num_classes=dataset.num_classes)
    variables = resnet.with_fresh_head(module, pretrained, rng)
    # DomainBed's ResNet adapts the stem to inputs of other than 3
    # channels (ARM's 4: the image and its context).
    if sample_x.shape[-1] != 3:
      variables = resnet.with_input_channels(variables, sample_x.shape[-1])
  else:
    print("No config.pretrained_checkpoint: the ResNet starts from random "
          "weights, unlike DomainBed's ImageNet initialization.", flush=True)
    variables = models.init_variables(module, rng, sample_x)
  return module, {"batch_stats": variables["batch_stats"]}, variables["params"]


def as_network(module: nn.Module, frozen: PyTree,
               dropout_rate: float | jax.Array | None = None
               ) -> algorithms.Network:
  """The Network of a `make_network` module; a ResNet's with `dropout_rate`
  (None: its own; a vectorized program's per-run value may be traced)."""
  if not frozen:  # MNIST_CNN: no frozen statistics, no dropout
    return algorithms.Network.from_module(module)
  if dropout_rate is not None:
    module = module.clone(dropout_rate=dropout_rate)
  return algorithms.Network.from_module(module, frozen=frozen, stochastic=True)


# ------------------------------------------------------------------ the run


class _RunParts(NamedTuple):
  """One run's pieces, before they become a train.Run alone or in a group."""
  run: train.Run  # its train_step and batches: None in a group
  spec: train.StepSpec
  module: nn.Module
  frozen: PyTree
  num_domains: int
  host_batches: Callable[[int], Iterator[dict[str, np.ndarray]]]
  measures: "_Measures"  # its evaluation's jitted functions, to share


class _Measures(NamedTuple):
  """The jitted evaluations of one network, shared by a group's runs (one
  compile)."""
  accuracy: Callable[[PyTree, Iterable[dict]], float]
  landscape: Callable


def _measures(config: ml_collections.ConfigDict, module: nn.Module,
              frozen: PyTree, num_domains: int,
              algorithm: algorithms.Algorithm) -> _Measures:
  network = as_network(module, frozen)
  return _Measures(
      evaluation.make_accuracy_fn(algorithm.logits_fn(network)),
      landscape.recorder(lambda params, x: network.forward(params, x, None),
                         num_domains, config.diagnostics_layers))


def _make_parts(config: ml_collections.ConfigDict, workdir: str,
                mesh: jax.sharding.Mesh, alone: bool,
                measures: _Measures | None = None) -> _RunParts:
  """A run's data, model, state and evaluation. `alone`: its own jitted step
  and sharded batches on `mesh`; else its state on mesh's first device, for
  a group to stack. `measures`: the evaluations to share."""
  config = resolve_config(config)
  hparams = resolve_hparams(config)
  alg_config, schedule = settings.from_domainbed(
      config.algorithm, hparams, config.get(config.algorithm))

  # Input.
  dataset = domainbed.get_dataset(config.dataset, config.data_dir,
                                  config.digits_source, config.image_size,
                                  seed=config.seed)
  test_envs = [int(e) for e in config.test_envs]
  train_envs = [e for e in range(len(dataset)) if e not in test_envs]
  splits = domainbed.split_environments(dataset, config.holdout_fraction,
                                        config.trial_seed)
  domainbed.check_splits(dataset, splits, config.holdout_fraction)
  batch_size = int(hparams["batch_size"])
  steps_per_epoch = min(len(splits[e][0]) / batch_size for e in train_envs)
  eval_passes = domainbed.eval_batches(dataset, splits, config.eval_batch_size,
                                       worker_count=config.worker_count)

  # Model, optimizer, algorithm.
  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
  sample = next(domainbed.train_batches(dataset, splits, train_envs, batch_size,
                                        config.seed))
  module, frozen, params = make_network(
      dataset, hparams, config, init_rng,
      algorithms.network_input(config.algorithm, sample["x"][:1]))
  spec = _step_spec(config, hparams, alg_config, schedule)
  make_algorithm = algorithm_factory(config.algorithm, module, frozen,
                                     len(train_envs))
  built = steps.build(make_algorithm, spec, mesh, len(train_envs),
                      runs=not alone,
                      xla_cpu_dot_fusion=config.xla_cpu_dot_fusion)
  # A group's runs share the first run's: how an algorithm predicts depends
  # on no per-run field.
  measures = measures or _measures(config, module, frozen, len(train_envs),
                                   make_algorithm(spec, None))
  diagnosed = config.diagnostics_every and domainbed.diagnostics_batch(
      dataset, splits, train_envs, config.diagnostics_examples)
  state = built.init_state(state_rng, params, jax.device_put(sample))

  def host_batches(start_step):
    return domainbed.train_batches(
        dataset, splits, train_envs, batch_size, config.seed,
        start_step=start_step, augment=hparams["data_augmentation"],
        worker_count=config.worker_count,
        process_shard=(jax.process_index(), jax.process_count()))

  batches = None
  if alone:
    batches = lambda start_step: map(built.shard, host_batches(start_step))

  def evaluate(params):
    return {f"{name}_acc": measures.accuracy(params, make_pass())
            for name, make_pass in eval_passes.items()}

  run = train.Run(
      workdir=workdir, config_json=config.to_json_best_effort(indent=2),
      steps=config.steps, record_every=config.checkpoint_freq, state=state,
      train_step=built.step if alone else None, batches=batches,
      evaluate=evaluate,
      evaluate_before_update=False, epoch=lambda s: s / steps_per_epoch,
      fields={"hparams": hparams, "args": record_args(config)},
      block_each_step=parallel.must_block_each_step(mesh),
      name=f"{config.dataset} {config.algorithm}",
      diagnose=lambda params: measures.landscape(params, diagnosed),
      diagnostics_every=config.diagnostics_every)
  return _RunParts(run, spec, module, frozen, len(train_envs), host_batches,
                   measures)


def make_run(config: ml_collections.ConfigDict, workdir: str) -> train.Run:
  """The train.Run of one DomainBed run."""
  mesh = parallel.make_mesh(config.num_devices)
  return _make_parts(config, workdir, mesh, alone=True).run


# DomainBed's shared hparams that a run of a program may set alone (the
# algorithms' own ones map to their Config and Schedule).
SCALAR_HPARAMS = ("lr", "weight_decay", "resnet_dropout")


def _step_spec(config: ml_collections.ConfigDict, hparams: dict[str, Any],
               alg_config: Any, schedule: algorithms.Schedule
               ) -> train.StepSpec:
  return train.StepSpec(
      alg_config, schedule, hparams["lr"], hparams["weight_decay"],
      dropout_rate=float(hparams["resnet_dropout"]),
      optimizer=config.optimizer)


def algorithm_factory(name: str, module: nn.Module, frozen: PyTree,
                      num_domains: int) -> train.AlgorithmFactory:
  """A run's algorithm over `module`, with its StepSpec's dropout rate."""
  return lambda spec, mesh: algorithms.make_algorithm(
      name, as_network(module, frozen, spec.dropout_rate), num_domains,
      spec.algorithm, spec.schedule, mesh)


# Config fields in which the runs of one program may differ (with the
# scalar hparams; program_key).
PER_RUN_FIELDS = ("seed", "hparams_seed", "trial_seed", "hparams",
                  "test_envs")


def program_key(config: ml_collections.ConfigDict) -> str:
  """Runs with equal keys can train as one vectorized program: they differ
  in seeds, test envs (not their number) and scalar hparams
  (vectorized.group_key); everything else, the shape-making hparams (batch
  size, augmentation, ResNet depth) too, is the same."""
  config = resolve_config(config)
  hparams = resolve_hparams(config)
  alg_config, schedule = settings.from_domainbed(
      config.algorithm, hparams, config.get(config.algorithm))
  scalars = _step_spec(config, hparams, alg_config, schedule)
  shared = config.to_dict()
  for field in PER_RUN_FIELDS:
    shared.pop(field)
  shared["num_test_envs"] = len(config.test_envs)
  shapes = {k: v for k, v in hparams.items()
            if k in hparams_lib.shared_specs(config.algorithm, config.dataset)
            and k not in SCALAR_HPARAMS}
  return json.dumps([shared, shapes, repr(vectorized.group_key(scalars))],
                    sort_keys=True, default=str)


def make_group(configs: list[ml_collections.ConfigDict],
               workdirs: list[str]) -> vectorized.Group:
  """Runs with one `program_key` as a vectorized.Group: one vectorized step, each
  run in its own folder. They share the first run's module (each with its
  own dropout rate), whose frozen batch statistics must be theirs too, and
  its evaluation."""
  if len({program_key(c) for c in configs}) > 1:
    raise errors.ConfigError(
        "These DomainBed runs cannot train as one program: they differ in "
        "more than seeds and scalar hparams (train_domainbed.program_key).")
  mesh = parallel.make_runs_mesh(len(configs), configs[0].num_devices)
  parts = [_make_parts(configs[0], workdirs[0], mesh, alone=False)]
  module, frozen = parts[0].module, parts[0].frozen
  parts += [_make_parts(c, w, mesh, alone=False, measures=parts[0].measures)
            for c, w in zip(configs[1:], workdirs[1:])]
  for part in parts[1:]:
    if not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(part.frozen), jax.tree.leaves(frozen))):
      raise errors.ConfigError(
          f"{part.run.workdir} and {parts[0].run.workdir} start from "
          "different frozen batch statistics, so they cannot train as one "
          "program; launch them with runs_per_program=1.")
  shared, varying = vectorized.split_hparams([p.spec for p in parts])
  make_algorithm = algorithm_factory(configs[0].algorithm, module, frozen,
                                     parts[0].num_domains)

  def build(program_mesh):  # a program of runs on program_mesh
    return steps.build(make_algorithm, shared, program_mesh,
                       parts[0].num_domains, runs=True,
                       xla_cpu_dot_fusion=configs[0].xla_cpu_dot_fusion)

  def batches(indices, start_step, built):
    iterators = [parts[i].host_batches(start_step) for i in indices]
    while True:
      yield built.shard([next(it) for it in iterators])

  group_step = vectorized.resolve_group_step(configs[0].group_step,
                                             mesh.devices.flat[0].platform)
  return vectorized.make_group([p.run for p in parts], build, varying,
                               configs[0].num_devices, batches, group_step)


def run_folder(config: ml_collections.ConfigDict, workdir: str
               ) -> workdir_lib.RunFolder:
  """The run's folder, with the config it records (checked before any data
  is loaded)."""
  return workdir_lib.RunFolder(
      workdir, resolve_config(config).to_json_best_effort(indent=2))


def recorded_steps(config: ml_collections.ConfigDict) -> list[int]:
  """The steps a finished run has records of."""
  config = resolve_config(config)
  return [s for s in range(config.steps)
          if train.itstime(s, config.checkpoint_freq, config.steps)]


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> list[dict[str, Any]]:
  """Runs (or resumes) one DomainBed run; returns its records."""
  folder = run_folder(config, workdir)
  with folder.lock():  # before loading any data
    finished = folder.finished_records(recorded_steps(config))
    if finished is not None:
      return finished
    return train.train_loop(make_run(config, workdir))


def train_runs(configs: list[ml_collections.ConfigDict], workdirs: list[str],
               runs_per_program: int = 0) -> list[list[dict[str, Any]] | None]:
  """Runs (or resumes) several DomainBed runs, those with one `program_key`
  `runs_per_program` at a time (0: all) as one vectorized.Group; returns each
  run's records, in order (None for a run another process holds: it is
  skipped with a message). Each run's folder is locked and its config
  checked before any data is loaded."""
  if runs_per_program < 0:
    raise errors.ConfigError(f"runs_per_program={runs_per_program}: must be "
                             ">= 0 (0: all the runs that can share one).")
  folders = [os.path.abspath(w) for w in workdirs]
  if len(set(folders)) < len(folders):
    raise errors.ConfigError("The runs' workdirs must differ; some are "
                             "listed twice.")
  by_key: dict[str, list[int]] = {}
  for i, config in enumerate(configs):
    by_key.setdefault(program_key(config), []).append(i)
  results: list = [None] * len(configs)
  for indices in by_key.values():
    size = runs_per_program or len(indices)
    for first in range(0, len(indices), size):
      with contextlib.ExitStack() as locks:
        todo = []
        for i in indices[first:first + size]:
          folder = run_folder(configs[i], workdirs[i])
          try:
            locks.enter_context(folder.lock())
          except errors.WorkdirBusyError as e:
            print(f"skipped: {e}", flush=True)
            continue
          finished = folder.finished_records(recorded_steps(configs[i]))
          if finished is None:
            todo.append(i)
          else:
            results[i] = finished
        if len(todo) == 1:
          results[todo[0]] = train.train_loop(
              make_run(configs[todo[0]], workdirs[todo[0]]))
        elif todo:
          group = make_group([configs[i] for i in todo],
                             [workdirs[i] for i in todo])
          for i, records in zip(todo, vectorized.train_group(group)):
            results[i] = records
  return results
