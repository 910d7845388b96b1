"""Train state, the jitted train step, and the Colored MNIST trainer.

Sections, in order: optimizer; train state; update step; evaluation; the
training loop (`train_and_evaluate`), which `main.py` and the experiment
scripts call, so everything here is usable from a notebook too.
"""

import json
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from fishr_jax import algorithms
from fishr_jax.algorithms import settings
from fishr_jax import evaluation
from fishr_jax import fast_paths
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax.data import colored_mnist
from fishr_jax.data import mnist

PyTree = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
TrainStep = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]

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


# --------------------------------------------------------------- update step


def make_train_step(algorithm: algorithms.Algorithm,
                    tx: optax.GradientTransformation,
                    schedule: algorithms.Schedule) -> TrainStep:
  """The pure train step (jit it): gradient of the algorithm's loss, the
  optimizer reset when the penalty switches on (if scheduled), the update.
  """
  reset_step = schedule.optimizer_reset_step

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    grads, (alg_state, metrics) = jax.grad(algorithm.loss_fn, has_aux=True)(
        state.params, state.alg_state, batch, state.step, step_rng)
    opt_state = state.opt_state
    if reset_step is not None:
      # DomainBed builds a fresh Adam when the full penalty weight switches on.
      fresh = tx.init(state.params)
      opt_state = jax.tree.map(
          lambda new, old: jnp.where(state.step == reset_step, new, old), fresh,
          opt_state)
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


# ------------------------------------------------------------- training loop


def make_colored_mnist_model(config: ml_collections.ConfigDict) -> models.MLP:
  return models.MLP(hidden_dims=(config.hidden_dim,) * 2, num_outputs=1,
                    dtype=models.compute_dtype(config.compute_dtype))


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Colored MNIST (IRM setup): `config.restarts` full-batch runs.

  Writes workdir/config.json, workdir/metrics.jsonl (one JSON line per logged
  step of each restart) and workdir/results.json, and returns the results:
  {"algorithm", "restarts", "train_acc", "test_acc", "gray_acc"}, each
  accuracy {"mean", "std", "values"} over restarts, taken from the forward
  pass of the last step (before its update), as the official script does.
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2) + "\n")

  pools = mnist.load_digit_pools(config.data.source, config.data.data_dir)
  model = make_colored_mnist_model(config)
  num_domains = len(config.data.train_color_flip_probs)
  mesh = parallel.make_mesh(config.num_devices)
  alg_config, schedule = settings.from_config_dict(config)
  algorithm = algorithms.make_algorithm(config.algorithm, model, num_domains,
                                        alg_config, schedule, mesh)
  tx = make_optimizer(config.lr, config.weight_decay)
  train_step = jit_train_step(make_train_step(algorithm, tx, schedule), mesh,
                              config.xla_cpu_dot_fusion)
  eval_accuracy = evaluation.make_accuracy_fn(model)

  final = {"train_acc": [], "test_acc": [], "gray_acc": []}
  total_steps = config.restarts * config.steps
  start = time.time()
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as log, \
       tqdm.tqdm(total=total_steps, disable=None, unit="step") as bar:
    for restart in range(config.restarts):
      envs = colored_mnist.make_environments(
          pools, config.data, np.random.default_rng([config.seed, restart]))
      batch = parallel.shard_batch(parallel.process_part(envs.train), mesh,
                                   algorithm.needs_domain_blocks, num_domains)
      evals = parallel.replicate(envs.evals, mesh)
      init_rng, rng = jax.random.split(
          jax.random.fold_in(jax.random.key(config.seed), restart))
      params = model.init(init_rng, batch["x"][:1])["params"]
      state = parallel.replicate(
          create_train_state(rng, params, algorithm, tx, batch), mesh)
      for step in range(config.steps):
        logged = step % config.log_every == 0 or step == config.steps - 1
        if logged:  # the parameters this step's forward pass sees
          eval_accs = {f"{name}_acc": eval_accuracy(state.params, env)
                       for name, env in evals.items()}
          eval_accs["train_acc"] = eval_accuracy(state.params, batch)
        state, metrics = train_step(state, batch)
        bar.update()
        if logged:
          record = {"restart": restart, "step": step,
                    **jax.tree.map(float, {**metrics, **eval_accs})}
          log.write(json.dumps(record) + "\n")
          log.flush()
          bar.write(evaluation.format_record(record))
      for key in final:
        final[key].append(record[key])

  results = {"algorithm": config.algorithm, "restarts": config.restarts,
             **{k: evaluation.summarize(v) for k, v in final.items()},
             "wall_time_s": time.time() - start}
  _write_json(os.path.join(workdir, "results.json"), results)
  print(evaluation.format_results(results), flush=True)
  return results
