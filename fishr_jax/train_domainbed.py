"""One DomainBed run: train on the training envs, evaluate every env's in/out
splits every `checkpoint_freq` steps, resume from the last checkpoint.

Sections: hparams and config; input; model and optimizer; checkpoints;
evaluation; the loop (`train_and_evaluate`). Writes, under workdir:
  results.jsonl  one DomainBed record per checkpoint (step, epoch, every
                 env's in/out accuracy, loss terms, step_time, hparams, args)
  checkpoints/   orbax checkpoints of the train state (the last two)
  done           written at the end; a finished run is not run again.
A run killed at any point and started again with the same command resumes
from its last checkpoint and ends with the same parameters and records
(timings aside): the batches of step k depend only on (seed, k), and the
records past the restored step are dropped and recomputed.
"""

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fishr_jax import algorithms
from fishr_jax import hparams as hparams_lib
from fishr_jax import losses
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax import train
from fishr_jax.algorithms import registry
from fishr_jax.algorithms import settings
from fishr_jax.data import domainbed

RECORDS = "results.jsonl"
DONE = "done"

# -------------------------------------------------------- hparams and config


def resolve_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """DomainBed's sampled hparams, with every explicitly set override."""
  values = hparams_lib.sample_hparams(config.algorithm, config.dataset,
                                      config.hparams_seed, config.trial_seed)
  for name, value in config.hparams.items():
    name = "lambda" if name == "lambda_" else name
    if value is None:
      continue
    if name not in values:
      raise ValueError(f"hparams.{name} is not an hparam of {config.algorithm} "
                       f"on {config.dataset}; known: {sorted(values)}.")
    values[name] = type(values[name])(value)
  return values


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


# -------------------------------------------------------------- checkpoints


def _to_saveable(state: train.TrainState) -> train.TrainState:
  return state.replace(rng=jax.random.key_data(state.rng))


def _restore(manager: ocp.CheckpointManager,
             template: train.TrainState) -> train.TrainState | None:
  step = manager.latest_step()
  if step is None:
    return None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(template))
  restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  return restored.replace(rng=jax.random.wrap_key_data(restored.rng))


def _read_records(path: str, up_to_step: int) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r["step"] <= up_to_step]


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


# ----------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> list[dict[str, Any]]:
  """Runs (or resumes) one DomainBed run; returns its records."""
  os.makedirs(workdir, exist_ok=True)
  records_path = os.path.join(workdir, RECORDS)
  if os.path.exists(os.path.join(workdir, DONE)):
    print(f"{workdir} is done; delete its 'done' file to run it again.")
    return _read_records(records_path, config.steps)

  config = config.copy_and_resolve_references()
  hparams = resolve_hparams(config)
  alg_config, schedule = settings.from_domainbed(
      config.algorithm, hparams, config.get(config.algorithm))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2) + "\n")

  # Input.
  dataset = domainbed.get_dataset(config.dataset, config.data_dir,
                                  config.digits_source, config.image_size,
                                  seed=config.seed)
  if config.checkpoint_freq is None:
    config.checkpoint_freq = dataset.checkpoint_freq
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
  mesh = parallel.make_mesh(config.num_devices)
  algorithm = algorithms.make_algorithm(config.algorithm, network,
                                        len(train_envs), alg_config, schedule,
                                        mesh)
  tx = train.make_optimizer(hparams["lr"], hparams["weight_decay"])
  train_step = train.jit_train_step(
      train.make_train_step(algorithm, tx, schedule), mesh,
      config.xla_cpu_dot_fusion, donate=False)
  accuracy = make_accuracy_fn(network)
  state = train.create_train_state(state_rng, params, algorithm, tx,
                                   jax.device_put(sample))

  # Checkpoints: resume if any.
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=2))
  restored = _restore(manager, state)
  start_step = 0
  records = []
  if restored is not None:
    state, start_step = restored, int(restored.step)
    records = _read_records(records_path, start_step - 1)
    print(f"Resuming {workdir} from step {start_step}.", flush=True)
  state = parallel.replicate(state, mesh)
  with open(records_path, "w") as f:  # drop records past the checkpoint
    f.writelines(json.dumps(r) + "\n" for r in records)

  args = record_args(config)
  batches = domainbed.train_batches(
      dataset, splits, train_envs, batch_size, config.seed,
      start_step=start_step, augment=hparams["data_augmentation"],
      worker_count=config.worker_count,
      process_shard=(jax.process_index(), jax.process_count()))
  pending: dict[str, list[float]] = {}
  for step in range(start_step, config.steps):
    start = time.time()
    state, metrics = train_step(state, parallel.shard_batch(
        next(batches), mesh, algorithm.needs_domain_blocks, len(train_envs)))
    metrics = jax.device_get(metrics)
    pending.setdefault("step_time", []).append(time.time() - start)
    for key, value in metrics.items():
      pending.setdefault(key, []).append(float(value))
    if step % config.checkpoint_freq and step != config.steps - 1:
      continue
    record = {"step": step, "epoch": step / steps_per_epoch,
              **{k: float(np.mean(v)) for k, v in pending.items()}}
    for name, make_pass in eval_passes.items():
      record[f"{name}_acc"] = accuracy(state.params, make_pass())
    record.update(hparams=hparams, args=args)
    pending = {}
    with open(records_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    manager.save(int(state.step), args=ocp.args.StandardSave(_to_saveable(state)))
    manager.wait_until_finished()
    records.append(record)
    accs = "  ".join(f"{k} {v:.3f}" for k, v in record.items() if k.endswith("_acc"))
    print(f"step {step}  loss {record['loss']:.4f}  {accs}", flush=True)

  manager.close()
  with open(os.path.join(workdir, DONE), "w") as f:
    f.write("done\n")
  return records
