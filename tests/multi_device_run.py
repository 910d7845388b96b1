"""Runs Fishr train steps on meshes of 1, 2, 4 and 8 fake CPU devices and
saves every result to an .npz (tests/test_parallel.py compares them).

Run in its own process: the device count is fixed when JAX starts.
  python tests/multi_device_run.py OUT.npz
"""

import contextlib
import sys

import chex

chex.set_n_cpu_devices(8)

import jax  # noqa: E402  (after the device count is set)
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from fishr_jax import algorithms  # noqa: E402
from fishr_jax import models  # noqa: E402
from fishr_jax import parallel  # noqa: E402
from fishr_jax import train  # noqa: E402

STEPS = 4
DEVICE_COUNTS = (None, 1, 2, 4, 8)  # None: no mesh
VARIANTS = {  # name: (algorithm, fishr overrides)
    "fishr_closed_form": ("fishr", {}),
    "fishr_vmap": ("fishr", {"grad_path": "vmap"}),
    "fishr_all_layers": ("fishr", {"params": "all"}),
    # The trainers' setting: each device's slice is laid out domain by domain.
    "fishr_all_layers_domain_blocks": ("fishr", {"params": "all",
                                                 "domain_blocks": True}),
    "erm": ("erm", {}),
    "mixup": ("mixup", {}),
}


def make_config(algorithm: str, fishr: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "algorithm": algorithm, "lr": 1e-2, "weight_decay": 1e-4,
      "l2_regularizer_weight": 0.0, "penalty_anneal_iters": 2,
      "penalty_warmup_weight": 0.0, "rescale_loss": False,
      "reset_optimizer_at_anneal": True,
      "fishr": {"lambda_": 100.0, "ema": 0.9, "reduction": "mean",
                "centered": True, "covariance": "diagonal",
                "grad_path": "closed_form", "params": "head",
                "vmap_chunk_size": None, **fishr},
      "mixup": {"alpha": 0.2},
  })


def make_batch(num_domains: int = 3, per_domain: int = 16) -> dict:
  rng = np.random.default_rng(0)
  n = num_domains * per_domain
  return {"x": rng.normal(size=(n, 10)).astype(np.float32),
          "y": rng.integers(0, 4, n).astype(np.int32),
          "domain": np.repeat(np.arange(num_domains, dtype=np.int32),
                              per_domain)}


def run(algorithm_name: str, fishr: dict, num_devices: int | None) -> dict:
  """num_devices None: plain jit on the default device, no mesh, the batch in
  its original domain-by-domain order."""
  config = make_config(algorithm_name, fishr)
  module = models.MLP(hidden_dims=(16,), num_outputs=4)
  network = algorithms.Network.from_module(module)
  algorithm = algorithms.make_algorithm(algorithm_name, network, 3, config)
  tx = train.make_optimizer(config)
  host_batch = make_batch()
  params = module.init(jax.random.key(1), host_batch["x"][:1])["params"]
  step = train.make_train_step(algorithm, tx, config)
  if num_devices is None:
    batch = jax.device_put(host_batch)
    step = jax.jit(step)
  else:
    mesh = parallel.make_mesh(num_devices)
    batch = parallel.shard_batch(host_batch, mesh)
    assert batch["x"].sharding.spec[0] == parallel.DATA_AXIS, batch["x"].sharding
    # Every device holds a slice of every domain.
    for shard in batch["domain"].addressable_shards:
      assert set(np.asarray(shard.data).tolist()) == {0, 1, 2}, shard
    step = jax.jit(step, out_shardings=parallel.replicated(mesh))
  state = train.create_train_state(jax.random.key(2), params, algorithm, tx,
                                   batch)
  if num_devices is not None:
    state = parallel.replicate(state, mesh)
    with jax.set_mesh(mesh):
      out_hlo = step.lower(state, batch).compile().as_text()
      step_jaxpr = str(jax.make_jaxpr(step)(state, batch))
  losses = []
  with jax.set_mesh(mesh) if num_devices else contextlib.nullcontext():
    for _ in range(STEPS):
      state, metrics = step(state, batch)
      losses.append(metrics["loss"])
  out = {"loss": np.stack(losses),
         "collectives": np.array([
             "all-reduce" in out_hlo, "all-gather" in out_hlo])
         if num_devices else np.zeros(2, bool),
         # Block sums per device: with domain_blocks False the closed form
         # picks them or the routed sums at run time (a cond); without
         # blocks on offer there would be no cond.
         "has_cond": np.array(num_devices is not None
                              and "cond[" in step_jaxpr),
         "params": np.concatenate([np.ravel(p) for p in
                                   jax.tree.leaves(state.params)])}
  if algorithm_name == "fishr":
    out["penalty"] = np.asarray(metrics["penalty"])
    out["ema"] = np.concatenate([np.ravel(v) for v in
                                 jax.tree.leaves(state.alg_state)])
    # The gradient of the loss at the final state, through the penalty.
    # Traced under the mesh, as the trainers trace the step.
    with jax.set_mesh(mesh) if num_devices else contextlib.nullcontext():
      grads = jax.jit(jax.grad(lambda p: algorithm.loss_fn(
          p, state.alg_state, batch, jnp.asarray(3), jax.random.key(0))[0]))(
              state.params)
    out["grads"] = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  return out


def main(path: str) -> None:
  assert len(jax.devices()) == 8, jax.devices()
  results = {}
  for name, (algorithm_name, fishr) in VARIANTS.items():
    for n in DEVICE_COUNTS:
      for key, value in run(algorithm_name, fishr, n).items():
        results[f"{name}/{n}/{key}"] = value
  np.savez(path, **results)


if __name__ == "__main__":
  main(sys.argv[1])
