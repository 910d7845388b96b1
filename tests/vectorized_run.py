"""Trains a few runs one by one and as one vectorized program, for
tests/test_vectorized.py. On several devices, run it in its own process
(the device count is fixed when JAX starts):
  python tests/vectorized_run.py OUT.json
"""

import json
import sys

import jax
import numpy as np

from fishr_jax import algorithms
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax import train
from fishr_jax import vectorized
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

STEPS = 5
NUM_DOMAINS = 3
PER_DOMAIN = 8
# Three runs' scalar hparams; every one differs between runs.
LRS = (1e-2, 3e-3, 5e-3)
WEIGHT_DECAYS = (0.0, 1e-3, 5e-4)  # 0 and not: a zero need not group apart
ANNEALS = (2, 3, 1)  # each run's optimizer resets at its own step
WARMUPS = (1.0, 0.5, 2.0)
# name: (algorithm, fixed options, per-run options)
CASES = {
    "fishr_closed_form": ("fishr", {"moment_sums": "auto"},
                          {"lambda_": (100.0, 10.0, 1000.0),
                           "ema": (0.9, 0.5, 0.95)}),
    "fishr_vmap": ("fishr", {"grad_path": "vmap"},
                   {"lambda_": (100.0, 10.0, 1000.0), "ema": (0.9, 0.5, 0.95)}),
    "erm": ("erm", {}, {}),
    "irm": ("irm", {}, {"lambda_": (100.0, 10.0, 1.0)}),
    "groupdro": ("groupdro", {}, {"eta": (1e-2, 1e-1, 5e-2)}),
    "mixup": ("mixup", {}, {"alpha": (0.2, 1.0, 0.5)}),
}


def run_hparams(case: str, run: int) -> vectorized.ScalarHParams:
  name, fixed, per_run = CASES[case]
  config = registry.get(name).config_class(
      **fixed, **{k: v[run] for k, v in per_run.items()})
  schedule = base.Schedule(penalty_anneal_iters=ANNEALS[run],
                           penalty_warmup_weight=WARMUPS[run],
                           reset_optimizer_at_anneal=True)
  return vectorized.ScalarHParams(config, schedule, LRS[run],
                                  WEIGHT_DECAYS[run])


def make_batch(run: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(run)
  n = NUM_DOMAINS * PER_DOMAIN
  return {"x": rng.normal(size=(n, 10)).astype(np.float32),
          "y": rng.integers(0, 4, n).astype(np.int32),
          "domain": np.repeat(np.arange(NUM_DOMAINS, dtype=np.int32),
                              PER_DOMAIN)}


MODULE = models.MLP(hidden_dims=(16,), num_outputs=4)


def factory(case: str, mesh=None) -> vectorized.AlgorithmFactory:
  name = CASES[case][0]
  return lambda config, schedule: algorithms.make_algorithm(
      name, MODULE, NUM_DOMAINS, config, schedule, mesh)


def initial_state(case: str, run: int, hparams: vectorized.ScalarHParams
                  ) -> train.TrainState:
  batch = make_batch(run)
  params = MODULE.init(jax.random.key(100 + run), batch["x"][:1])["params"]
  algorithm = factory(case)(hparams.algorithm, hparams.schedule)
  tx = train.make_optimizer(hparams.lr, hparams.weight_decay)
  return train.create_train_state(jax.random.key(200 + run), params, algorithm,
                                  tx, batch)


def alone(case: str, run: int) -> tuple[train.TrainState, list]:
  """Run `run` trained by itself (one device, no mesh)."""
  hparams = run_hparams(case, run)
  algorithm = factory(case)(hparams.algorithm, hparams.schedule)
  tx = train.make_optimizer(hparams.lr, hparams.weight_decay)
  step = jax.jit(train.make_train_step(algorithm, tx, hparams.schedule))
  state, batch = initial_state(case, run, hparams), make_batch(run)
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def together(case: str, runs: list[int], mesh) -> tuple[train.TrainState, list]:
  """`runs` trained as one program on `mesh` (parallel.make_runs_mesh)."""
  hparams = [run_hparams(case, r) for r in runs]
  shared, varying = vectorized.split_hparams(hparams)
  step = vectorized.jit_train_step(
      vectorized.make_train_step(factory(case, mesh), shared), mesh)
  algorithm = factory(case, mesh)(shared.algorithm, shared.schedule)
  states = vectorized.stack(
      [initial_state(case, r, h) for r, h in zip(runs, hparams)], mesh)
  batch = parallel.shard_run_batches([make_batch(r) for r in runs], mesh,
                                     algorithm.needs_domain_blocks, NUM_DOMAINS)
  values = jax.device_put(varying, parallel.run_sharding(mesh))
  losses = []
  for _ in range(STEPS):
    states, metrics = step(states, batch, values)
    jax.block_until_ready(states)
    losses.append(np.asarray(metrics["loss"]).tolist())
  return states, losses


def largest_differences(case: str, runs: list[int], mesh) -> dict[str, float]:
  """Largest relative differences between each run trained alone and in
  the program: of its parameters, algorithm state and every step's loss."""
  states, losses = together(case, runs, mesh)
  worst = {"params": 0.0, "alg_state": 0.0, "loss": 0.0, "step": 0.0}
  for i, run in enumerate(runs):
    state, run_losses = alone(case, run)
    lane = vectorized.unstack(states, i)
    for part in ("params", "alg_state"):
      for a, b in zip(jax.tree.leaves(getattr(state, part)),
                      jax.tree.leaves(getattr(lane, part))):
        scale = np.maximum(np.abs(np.asarray(a)), 1e-3)
        worst[part] = max(worst[part], float(np.max(np.abs(
            np.asarray(a) - np.asarray(b)) / scale)))
    together_losses = [step[i] for step in losses]
    worst["loss"] = max(worst["loss"], float(np.max(
        np.abs(np.subtract(run_losses, together_losses)) /
        np.maximum(np.abs(run_losses), 1e-3))))
    worst["step"] = max(worst["step"], abs(int(state.step) - int(lane.step)))
  return worst


def main(path: str) -> None:
  """Every case on 2 devices: runs over devices (2, 1), and each run's batch
  over devices (1, 2)."""
  assert len(jax.devices()) == 2, jax.devices()
  out = {f"{case} {shape}": largest_differences(
      case, [0, 1], parallel.make_runs_mesh(2, run_shards=shape[0]))
         for case in CASES for shape in ((2, 1), (1, 2))}
  with open(path, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  import chex  # pylint: disable=g-import-not-at-top
  chex.set_n_cpu_devices(2)
  main(sys.argv[1])
