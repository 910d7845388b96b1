"""Colored MNIST (IRM setup): `config.restarts` full-batch runs, each in its
own folder, trained `config.runs_per_program` at a time as one vectorized
program (vectorized.py), then summarized.

Writes, under workdir:
  restart_<r>/   one run each (config.json, results.jsonl, checkpoints/,
                 done): the train loop's files; a record every `log_every`
                 steps and at the last step, evaluating the parameters that
                 step's forward pass sees, as the official script does
  results.json   {"algorithm", "restarts", "train_acc", "test_acc",
                 "gray_acc", "wall_time_s"}, each accuracy {"mean", "std",
                 "values"} over restarts, from the last record of each run.
"""

import dataclasses
import itertools
import json
import os
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from fishr_jax import algorithms
from fishr_jax import evaluation
from fishr_jax import landscape
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax import steps
from fishr_jax import train
from fishr_jax import vectorized
from fishr_jax import workdir as workdir_lib
from fishr_jax.algorithms import settings
from fishr_jax.data import colored_mnist
from fishr_jax.data import mnist

DATASET = "ColoredMNIST_IRM"  # records' args["dataset"]
ACCURACIES = ("train_acc", "test_acc", "gray_acc")


def make_model(config: ml_collections.ConfigDict) -> models.MLP:
  return models.MLP(hidden_dims=(config.hidden_dim,) * 2, num_outputs=1,
                    dtype=models.compute_dtype(config.compute_dtype))


def record_args(config: ml_collections.ConfigDict, restart: int) -> dict:
  """The run's arguments in its records (model_selection reads them)."""
  return {"experiment": "colored_mnist", "dataset": DATASET,
          "algorithm": config.algorithm, "restart": restart,
          "seed": config.seed, "steps": config.steps,
          "hidden_dim": config.hidden_dim, "data_source": config.data.source}


def restart_config_json(config: ml_collections.ConfigDict) -> str:
  """The config each restart records: what one restart depends on (a resume
  may ask for more restarts, or train them another number at a time)."""
  run_config = config.to_dict()
  for field in ("restarts", "runs_per_program"):
    del run_config[field]
  return json.dumps(run_config, indent=2, sort_keys=True, default=str)


def restart_folder(workdir: str, restart: int) -> str:
  return os.path.join(workdir, f"restart_{restart}")


def make_groups(config: ml_collections.ConfigDict, workdir: str
                ) -> Iterator[train.Run | vectorized.Group]:
  """The restarts, `config.runs_per_program` at a time (0: all of them), as
  vectorized.Groups made as they are asked for (each holds its full batches
  on the devices); with one at a time, each restart is a train.Run trained
  by its own step, shared by every restart (one compile)."""
  pools = mnist.load_digit_pools(config.data.source, config.data.data_dir)
  model = make_model(config)
  num_domains = len(config.data.train_color_flip_probs)
  per_program = config.runs_per_program or config.restarts
  alone = per_program == 1  # each restart its own step, on the data mesh
  alg_config, schedule = settings.from_config_dict(config)
  spec = train.StepSpec(alg_config, schedule, config.lr, config.weight_decay,
                        optimizer=config.optimizer)

  make_algorithm = lambda s, m: algorithms.make_algorithm(
      config.algorithm, model, num_domains, s.algorithm, s.schedule, m)

  def build(mesh, runs):
    return steps.build(make_algorithm, spec, mesh, num_domains, runs=runs,
                       xla_cpu_dot_fusion=config.xla_cpu_dot_fusion)

  if alone:
    mesh = parallel.make_mesh(config.num_devices)
    place = lambda tree: parallel.replicate(tree, mesh)
  else:  # each restart on the first device; a group stacks them
    mesh = parallel.make_runs_mesh(per_program, config.num_devices)
    place = lambda tree: jax.device_put(tree, mesh.devices.flat[0])
  built = build(mesh, runs=not alone)
  group_step = vectorized.resolve_group_step(config.group_step,
                                             mesh.devices.flat[0].platform)

  accuracy = evaluation.make_accuracy_fn(make_algorithm(spec, None).logits_fn(
      algorithms.Network.from_module(model)), pad=False)
  landscape_fields = landscape.recorder(
      lambda params, x: model.apply({"params": params}, x), num_domains,
      config.diagnostics_layers)
  run_config_json = restart_config_json(config)
  fields = {"lr": config.lr, "weight_decay": config.weight_decay,
            **dataclasses.asdict(schedule),
            **{f"{config.algorithm}.{k}": v
               for k, v in dataclasses.asdict(alg_config).items()}}

  def restart_run(restart: int) -> tuple[train.Run, dict[str, np.ndarray]]:
    envs = colored_mnist.make_environments(
        pools, config.data, np.random.default_rng([config.seed, restart]))
    host_batch = parallel.process_part(envs.train)
    batch = built.shard(host_batch) if alone else place(host_batch)
    evals = {"train": batch, **place(envs.evals)}
    init_rng, rng = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed), restart))
    params = model.init(init_rng, algorithms.network_input(
        config.algorithm, batch["x"][:1]))["params"]
    state = built.init_state(rng, params, batch)
    run = train.Run(
        workdir=restart_folder(workdir, restart),
        config_json=run_config_json,
        steps=config.steps, record_every=config.log_every, state=state,
        train_step=built.step if alone else None,
        batches=(lambda start: itertools.repeat(batch)) if alone else None,
        evaluate=lambda params: {
            f"{name}_acc": accuracy(params, [env])
            for name, env in evals.items()},
        evaluate_before_update=True,
        fields={"hparams": fields, "args": record_args(config, restart)},
        checkpoint_every=config.checkpoint_every,
        block_each_step=parallel.must_block_each_step(mesh),
        name=f"restart {restart}",
        # The training environments, whole.
        diagnose=lambda params: landscape_fields(params, batch),
        diagnostics_every=config.diagnostics_every)
    return run, host_batch

  for first in range(0, config.restarts, per_program):
    made = [restart_run(r) for r in
            range(first, min(first + per_program, config.restarts))]
    if alone:
      yield made[0][0]
    else:
      hosts = [host_batch for _, host_batch in made]
      yield vectorized.make_group(
          [run for run, _ in made], lambda m: build(m, runs=True), {},
          config.num_devices,
          lambda indices, start, built, hosts=hosts: itertools.repeat(
              built.shard([hosts[i] for i in indices])), group_step)


def summarize(config: ml_collections.ConfigDict,
              final_records: list[train.Record],
              wall_time_s: float) -> dict[str, Any]:
  return {"algorithm": config.algorithm, "restarts": len(final_records),
          **{k: evaluation.summarize([r[k] for r in final_records])
             for k in ACCURACIES},
          "wall_time_s": wall_time_s}


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains (or resumes) every restart; returns and writes the results."""
  primary = parallel.is_primary()
  with workdir_lib.primary_lock(workdir):  # the restarts' parent folder
    # Every restart folder this run would resume must agree with its config
    # before anything is written: a refused rerun leaves the parent's
    # config.json saying what its restarts were trained with.
    run_config_json = restart_config_json(config)
    for restart in range(config.restarts):
      workdir_lib.RunFolder(restart_folder(workdir, restart),
                            run_config_json).check_config()
    start = time.time()
    final = []
    for i, runs in enumerate(make_groups(config, workdir)):
      if i == 0 and primary:  # the data loaded, the restarts' configs agree
        workdir_lib.write_text(os.path.join(workdir, workdir_lib.CONFIG),
                               config.to_json_best_effort(indent=2) + "\n")
      if isinstance(runs, train.Run):
        final.append(train.train_loop(runs)[-1])
      else:
        final += [records[-1] for records in vectorized.train_group(runs)]
    results = summarize(config, final, time.time() - start)
    if primary:
      workdir_lib.write_json(os.path.join(workdir, "results.json"), results)
      print(evaluation.format_results(results), flush=True)
  return results
