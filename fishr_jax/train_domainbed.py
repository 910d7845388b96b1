"""One DomainBed run: train on the training envs, evaluate every env's in/out
splits every `checkpoint_freq` steps (after that step's update), through
train.train_loop (records, checkpoints, resume, `done`).

Sections: hparams and config; the model; evaluation; the run
(`make_run`, `train_and_evaluate`). Each record is DomainBed's: step, epoch,
every env's in/out accuracy (env{i}_in_acc, env{i}_out_acc), the loss terms,
step_time, hparams, args.
"""

import json
import os
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fishr_jax import algorithms
from fishr_jax import config_checks
from fishr_jax import errors
from fishr_jax import hparams as hparams_lib
from fishr_jax import losses
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax import train
from fishr_jax import vectorized
from fishr_jax.algorithms import registry
from fishr_jax.algorithms import settings
from fishr_jax.data import domainbed


# -------------------------------------------------------- hparams and config


def resolve_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """DomainBed's sampled hparams, with every explicitly set override."""
  config_checks.check_hparam_overrides(config)
  values = hparams_lib.sample_hparams(config.algorithm, config.dataset,
                                      config.hparams_seed, config.trial_seed)
  for field, value in config.hparams.items():
    if value is not None:
      name = settings.hparam_name(field)
      values[name] = type(values[name])(value)
  return values


def resolve_config(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """The config as the run uses it: references resolved, checkpoint_freq
  the dataset's default when unset."""
  config = config.copy_and_resolve_references()
  if config.checkpoint_freq is None:
    config.checkpoint_freq = domainbed.CHECKPOINT_FREQ[config.dataset]
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
                 sample_x: np.ndarray) -> tuple[algorithms.Network, Any]:
  """(Network, initial trainable params) for the dataset's backbone."""
  dtype = models.compute_dtype(config.compute_dtype)
  if not dataset.is_image_folder:
    module = models.MNISTCNN(num_outputs=dataset.num_classes, dtype=dtype)
    params = jax.jit(module.init)(rng, sample_x)["params"]
    return algorithms.Network.from_module(module), params
  from fishr_jax import resnet  # pylint: disable=g-import-not-at-top
  depth = 18 if hparams["resnet18"] else 50
  module = resnet.ResNet(depth=depth, num_classes=dataset.num_classes,
                         dropout_rate=hparams["resnet_dropout"], dtype=dtype)
  if config.pretrained_checkpoint:  # ImageNet weights, a new head
    pretrained = resnet.load_torchvision_checkpoint(
        config.pretrained_checkpoint, depth, num_classes=dataset.num_classes)
    variables = resnet.with_fresh_head(module, pretrained, rng)
  else:
    print("No config.pretrained_checkpoint: the ResNet starts from random "
          "weights, unlike DomainBed's ImageNet initialization.", flush=True)
    variables = jax.jit(module.init)(rng, sample_x)
  network = algorithms.Network.from_module(
      module, frozen={"batch_stats": variables["batch_stats"]}, stochastic=True)
  return network, variables["params"]


# --------------------------------------------------------------- evaluation


def make_accuracy_fn(network: algorithms.Network):
  """(params, batches) -> accuracy over a split. Batches are zero-padded to a
  power of two so the jitted forward compiles for a few shapes only."""

  @jax.jit
  def correct_count(params, x, y, valid):
    _, logits = network.forward(params, x, None)
    return jnp.sum(losses.correct(logits, y) * valid)

  def accuracy(params, batches) -> float:
    correct, total = 0.0, 0
    for batch in batches:
      n = len(batch["y"])
      pad = max(8, 1 << (n - 1).bit_length()) - n
      x = np.pad(batch["x"], [(0, pad)] + [(0, 0)] * (batch["x"].ndim - 1))
      y = np.pad(batch["y"], (0, pad))
      valid = (np.arange(n + pad) < n).astype(np.float32)
      correct += float(correct_count(params, x, y, valid))
      total += n
    return correct / max(total, 1)

  return accuracy


# ------------------------------------------------------------------ the run


class _RunParts(NamedTuple):
  """One run's pieces, before they become a train.Run alone or in a group."""
  run: train.Run  # its train_step and batches: None in a group
  hparams: vectorized.ScalarHParams
  network: algorithms.Network
  num_domains: int
  host_batches: Callable[[int], Iterator[dict[str, np.ndarray]]]


def _make_parts(config: ml_collections.ConfigDict, workdir: str,
                mesh: jax.sharding.Mesh, alone: bool,
                accuracy: Callable | None = None) -> _RunParts:
  """A run's data, model, state and evaluation. `alone`: its own jitted step
  and sharded batches on `mesh`; else its state on mesh's first device, for
  a group to stack. `accuracy`: the evaluation to share (one compile)."""
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
  batch_size = int(hparams["batch_size"])
  steps_per_epoch = min(len(splits[e][0]) / batch_size for e in train_envs)
  eval_passes = domainbed.eval_batches(dataset, splits, config.eval_batch_size,
                                       worker_count=config.worker_count)

  # Model, optimizer, algorithm.
  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
  sample = next(domainbed.train_batches(dataset, splits, train_envs, batch_size,
                                        config.seed))
  network, params = make_network(dataset, hparams, config, init_rng,
                                 sample["x"][:1])
  algorithm = algorithms.make_algorithm(config.algorithm, network,
                                        len(train_envs), alg_config, schedule,
                                        mesh)
  tx = train.make_optimizer(hparams["lr"], hparams["weight_decay"])
  accuracy = accuracy or make_accuracy_fn(network)
  state = train.create_train_state(state_rng, params, algorithm, tx,
                                   jax.device_put(sample))
  state = (parallel.replicate(state, mesh) if alone
           else jax.device_put(state, mesh.devices.flat[0]))

  def host_batches(start_step):
    return domainbed.train_batches(
        dataset, splits, train_envs, batch_size, config.seed,
        start_step=start_step, augment=hparams["data_augmentation"],
        worker_count=config.worker_count,
        process_shard=(jax.process_index(), jax.process_count()))

  train_step = batches = None
  if alone:
    train_step = train.jit_train_step(
        train.make_train_step(algorithm, tx, schedule), mesh,
        config.xla_cpu_dot_fusion)

    def batches(start_step):
      for batch in host_batches(start_step):
        yield parallel.shard_batch(batch, mesh, algorithm.needs_domain_blocks,
                                   len(train_envs))

  def evaluate(params):
    return {f"{name}_acc": accuracy(params, make_pass())
            for name, make_pass in eval_passes.items()}

  run = train.Run(
      workdir=workdir, config_json=config.to_json_best_effort(indent=2),
      steps=config.steps, record_every=config.checkpoint_freq, state=state,
      train_step=train_step, batches=batches, evaluate=evaluate,
      evaluate_before_update=False, epoch=lambda s: s / steps_per_epoch,
      fields={"hparams": hparams, "args": record_args(config)},
      block_each_step=parallel.must_block_each_step(mesh),
      name=f"{config.dataset} {config.algorithm}")
  scalars = vectorized.ScalarHParams(alg_config, schedule, hparams["lr"],
                                     hparams["weight_decay"])
  return _RunParts(run, scalars, network, len(train_envs), host_batches)


def make_run(config: ml_collections.ConfigDict, workdir: str) -> train.Run:
  """The train.Run of one DomainBed run."""
  mesh = parallel.make_mesh(config.num_devices)
  return _make_parts(config, workdir, mesh, alone=True).run


# Config fields in which the runs of one program may differ (with the
# scalar hparams; program_key).
PER_RUN_FIELDS = ("seed", "hparams_seed", "trial_seed", "hparams",
                  "test_envs")


def program_key(config: ml_collections.ConfigDict) -> str:
  """Runs with equal keys can train as one vectorized program: they differ
  in seeds, test envs (not their number) and scalar hparams
  (vectorized.group_key); everything else, the shape-making hparams (batch
  size, augmentation, ResNet depth and dropout rate) too, is the same."""
  config = resolve_config(config)
  hparams = resolve_hparams(config)
  alg_config, schedule = settings.from_domainbed(
      config.algorithm, hparams, config.get(config.algorithm))
  scalars = vectorized.ScalarHParams(alg_config, schedule, hparams["lr"],
                                     hparams["weight_decay"])
  shared = config.to_dict()
  for field in PER_RUN_FIELDS:
    shared.pop(field)
  shared["num_test_envs"] = len(config.test_envs)
  shapes = {k: v for k, v in hparams.items()
            if k in hparams_lib.shared_specs(config.algorithm, config.dataset)
            and k not in ("lr", "weight_decay")}
  return json.dumps([shared, shapes, repr(vectorized.group_key(scalars))],
                    sort_keys=True, default=str)


def make_group(configs: list[ml_collections.ConfigDict],
               workdirs: list[str]) -> train.Group:
  """Runs with one `program_key` as a train.Group: one vectorized step, each
  run in its own folder. They share the first run's network (one module,
  the same frozen batch statistics) and its evaluation."""
  if len({program_key(c) for c in configs}) > 1:
    raise errors.ConfigError(
        "These DomainBed runs cannot train as one program: they differ in "
        "more than seeds and scalar hparams (train_domainbed.program_key).")
  mesh = parallel.make_runs_mesh(len(configs), configs[0].num_devices)
  parts = [_make_parts(configs[0], workdirs[0], mesh, alone=False)]
  accuracy = make_accuracy_fn(parts[0].network)
  parts += [_make_parts(c, w, mesh, alone=False, accuracy=accuracy)
            for c, w in zip(configs[1:], workdirs[1:])]
  shared, varying = vectorized.split_hparams([p.hparams for p in parts])
  name, network, num_domains = (configs[0].algorithm, parts[0].network,
                                parts[0].num_domains)
  make_algorithm = lambda c, s: algorithms.make_algorithm(
      name, network, num_domains, c, s, mesh)
  needs_blocks = make_algorithm(shared.algorithm,
                                shared.schedule).needs_domain_blocks
  step = vectorized.jit_train_step(
      vectorized.make_train_step(make_algorithm, shared), mesh,
      configs[0].xla_cpu_dot_fusion)

  def batches(indices, start_step):
    iterators = [parts[i].host_batches(start_step) for i in indices]
    while True:
      yield parallel.shard_run_batches([next(it) for it in iterators], mesh,
                                       needs_blocks, num_domains)

  return vectorized.make_group([p.run for p in parts], step, varying, mesh,
                               batches)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> list[dict[str, Any]]:
  """Runs (or resumes) one DomainBed run; returns its records."""
  with train.folder_lock(workdir):  # before loading any data
    train.check_same_config(
        workdir, resolve_config(config).to_json_best_effort(indent=2))
    finished = train.finished_records(workdir)
    if finished is not None:
      return finished
    return train.train_loop(make_run(config, workdir))


def train_runs(configs: list[ml_collections.ConfigDict], workdirs: list[str],
               runs_per_program: int = 0) -> list[list[dict[str, Any]]]:
  """Runs (or resumes) several DomainBed runs, those with one `program_key`
  `runs_per_program` at a time (0: all) as one vectorized program; returns
  each run's records, in order."""
  by_key: dict[str, list[int]] = {}
  for i, config in enumerate(configs):
    by_key.setdefault(program_key(config), []).append(i)
  results: list = [None] * len(configs)
  for indices in by_key.values():
    size = runs_per_program or len(indices)
    for first in range(0, len(indices), size):
      chunk = indices[first:first + size]
      todo = [i for i in chunk if not os.path.exists(
          os.path.join(workdirs[i], train.DONE))]
      for i in chunk:
        if i not in todo or len(todo) == 1:
          results[i] = train_and_evaluate(configs[i], workdirs[i])
      if len(todo) > 1:
        group = make_group([configs[i] for i in todo],
                           [workdirs[i] for i in todo])
        for i, records in zip(todo, train.train_group(group)):
          results[i] = records
  return results
