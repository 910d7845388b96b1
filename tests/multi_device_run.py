"""Runs Fishr train steps on meshes of 1, 2, 4 and 8 fake CPU devices and
saves every result to an .npz (tests/test_parallel.py compares them).

Run in its own process: the device count is fixed when JAX starts.
  python tests/multi_device_run.py OUT.npz
"""

import sys

import chex

import jax  # noqa: E402  (after the device count is set)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fishr_jax import algorithms  # noqa: E402
from fishr_jax.algorithms import fishr  # noqa: E402
from fishr_jax import models  # noqa: E402
from fishr_jax import parallel  # noqa: E402
from fishr_jax import train  # noqa: E402
from fishr_jax import optimizers

STEPS = 4
DEVICE_COUNTS = (None, 1, 2, 4, 8)  # None: no mesh
# name: (algorithm, fishr options, the variant whose one-device run it equals)
VARIANTS = {
    "fishr_closed_form": ("fishr", {}, None),
    "fishr_closed_form_fast": ("fishr", {"moment_sums": "auto"},
                               "fishr_closed_form"),
    "fishr_vmap": ("fishr", {"grad_path": "vmap"}, "fishr_closed_form"),
    "fishr_all_layers": ("fishr", {"params": "all"}, None),
    "fishr_all_layers_fast": ("fishr", {"params": "all", "moment_sums": "auto"},
                              "fishr_all_layers"),
    "fishr_not_centered": ("fishr", {"centered": False}, None),
    "fishr_not_centered_fast": ("fishr", {"centered": False,
                                          "moment_sums": "auto"},
                                "fishr_not_centered"),
    "fishr_covariance": ("fishr", {"grad_path": "vmap", "covariance": "full"},
                         None),
    "erm": ("erm", {}, None),
    "mixup": ("mixup", {}, None),
}


def make_config(algorithm: str, fishr_options: dict):
  if algorithm == "fishr":
    return fishr.Config(lambda_=100.0, ema=0.9, **fishr_options)
  return None  # the algorithm's defaults


SCHEDULE = algorithms.Schedule(penalty_anneal_iters=2,
                               reset_optimizer_at_anneal=True)


def make_batch(num_domains: int = 3, per_domain: int = 16) -> dict:
  rng = np.random.default_rng(0)
  n = num_domains * per_domain
  return {"x": rng.normal(size=(n, 10)).astype(np.float32),
          "y": rng.integers(0, 4, n).astype(np.int32),
          "domain": np.repeat(np.arange(num_domains, dtype=np.int32),
                              per_domain)}


def run(algorithm_name: str, fishr_options: dict,
        num_devices: int | None) -> dict:
  """num_devices None: plain jit on the default device, no mesh, the batch in
  its original domain-by-domain order."""
  config = make_config(algorithm_name, fishr_options)
  module = models.MLP(hidden_dims=(16,), num_outputs=4)
  network = algorithms.Network.from_module(module)
  mesh = None if num_devices is None else parallel.make_mesh(num_devices)
  algorithm = algorithms.make_algorithm(algorithm_name, network, 3, config,
                                        SCHEDULE, mesh)
  tx = optimizers.make(optimizers.ADAM, 1e-2, 1e-4)
  host_batch = make_batch()
  params = module.init(jax.random.key(1), host_batch["x"][:1])["params"]
  step = train.make_train_step(algorithm, tx, SCHEDULE)
  if num_devices is None:
    batch = jax.device_put(host_batch)
    step = jax.jit(step)
  else:
    batch = parallel.shard_batch(host_batch, mesh, algorithm.needs_domain_blocks,
                                 3)
    assert batch["x"].sharding.spec[0] == parallel.DATA_AXIS, batch["x"].sharding
    # Every device holds a slice of every domain.
    for shard in batch["domain"].addressable_shards:
      assert set(np.asarray(shard.data).tolist()) == {0, 1, 2}, shard
    step = jax.jit(step, out_shardings=parallel.replicated(mesh))
  state = train.create_train_state(jax.random.key(2), params, algorithm, tx,
                                   batch)
  if num_devices is not None:
    state = parallel.replicate(state, mesh)
    step = step.lower(state, batch).compile()  # one compile, also read below
    out_hlo = step.as_text()
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    jax.block_until_ready(state)  # as train_loop on CPU meshes
    losses.append(metrics["loss"])
  out = {"loss": np.stack(losses),
         "collectives": np.array([
             "all-reduce" in out_hlo, "all-gather" in out_hlo])
         if num_devices else np.zeros(2, bool),
         "params": np.concatenate([np.ravel(p) for p in
                                   jax.tree.leaves(state.params)])}
  if algorithm_name == "fishr":
    out["penalty"] = np.asarray(metrics["penalty"])
    out["ema"] = np.concatenate([np.ravel(v) for v in
                                 jax.tree.leaves(state.alg_state)])
    # The gradient of the loss at the final state, through the penalty.
    grads = jax.jit(jax.grad(lambda p: algorithm.loss_fn(
        p, state.alg_state, batch, jnp.asarray(3), jax.random.key(0))[0]))(
            state.params)
    out["grads"] = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  return out


def main(path: str) -> None:
  assert len(jax.devices()) == 8, jax.devices()
  results = {}
  for name, (algorithm_name, fishr_options, _) in VARIANTS.items():
    for n in DEVICE_COUNTS:
      for key, value in run(algorithm_name, fishr_options, n).items():
        results[f"{name}/{n}/{key}"] = value
  np.savez(path, **results)


if __name__ == "__main__":
  # Here, not at import: the tests import this module for its names, and the
  # device count must not leak into their process.
  chex.set_n_cpu_devices(8)
  main(sys.argv[1])
