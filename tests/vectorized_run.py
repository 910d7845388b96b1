"""Trains a few runs one by one and as one vectorized program, for
tests/test_vectorized.py. On several devices, run it in its own process
(the device count is fixed when JAX starts):
  python tests/vectorized_run.py OUT.json WORKDIR
"""

import functools
import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np

from fishr_jax import algorithms
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax import train
from fishr_jax import vectorized
from fishr_jax import workdir as workdir_lib
from fishr_jax import optimizers
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

STEPS = 5
NUM_DOMAINS = 3
PER_DOMAIN = 8
# Two runs' scalar hparams; every one differs between them.
LRS = (1e-2, 3e-3)
WEIGHT_DECAYS = (0.0, 1e-3)  # 0 and not: a zero need not group apart
ANNEALS = (2, 3)  # each run's optimizer resets at its own step
WARMUPS = (1.0, 0.5)
# name: (algorithm, fixed options, per-run options)
CASES = {
    "fishr_closed_form": ("fishr", {"moment_sums": "auto"},
                          {"lambda_": (100.0, 10.0),
                           "ema": (0.9, 0.5)}),
    "fishr_vmap": ("fishr", {"grad_path": "vmap"},
                   {"lambda_": (100.0, 10.0), "ema": (0.9, 0.5)}),
    "erm": ("erm", {}, {}),
    "irm": ("irm", {}, {"lambda_": (100.0, 10.0)}),
    "groupdro": ("groupdro", {}, {"eta": (1e-2, 1e-1)}),
    "mixup": ("mixup", {}, {"alpha": (0.2, 1.0)}),
    "sd": ("sd", {}, {"lambda_": (0.1, 1.0)}),
    "iga": ("iga", {}, {"lambda_": (10.0, 100.0)}),
    "andmask": ("andmask", {}, {"tau": (1.0, 0.5)}),
    "sandmask": ("sandmask", {}, {"tau": (0.5, 0.2), "k": (10.0, 1.0)}),
    "fish": ("fish", {}, {"meta_lr": (0.5, 0.1)}),
    "mldg": ("mldg", {"n_meta_test": 1}, {"beta": (1.0, 0.5)}),
    "rsc": ("rsc", {}, {"f_drop_factor": (1 / 3, 0.1),
                        "b_drop_factor": (1 / 3, 0.5)}),
    "dann": ("dann", {"grad_penalty": 0.1}, {"lambda_": (1.0, 0.1),
                                              "lr_d": (1e-2, 1e-3)}),
    "cdann": ("cdann", {}, {"beta1": (0.5, 0.9),
                            "lr_g": (1e-2, 1e-3)}),
    "sagnet": ("sagnet", {}, {"w_adv": (0.1, 1.0)}),
    "mtl": ("mtl", {}, {"ema": (0.99, 0.5)}),
    "ib_erm": ("ib_erm", {}, {"lambda_": (100.0, 10.0)}),
    "ib_irm": ("ib_irm", {"ib_penalty_anneal_iters": 2},
               {"ib_lambda": (100.0, 10.0)}),
    "causirl_coral": ("causirl_coral", {}, {"lambda_": (1.0, 0.1)}),
    "causirl_mmd": ("causirl_mmd", {}, {"lambda_": (1.0, 0.1)}),
    "cad": ("cad", {"normalize": True}, {"lambda_": (0.1, 1.0),
                                         "temperature": (0.1, 0.05)}),
    "condcad": ("condcad", {}, {"lambda_": (0.1, 1.0)}),
    "eqrm": ("eqrm", {"burnin_iters": 2}, {"quantile": (0.75, 0.5),
                                            "lr": (1e-3, 1e-2)}),
    # Images (5 x 2, one channel): its context network, BatchNorm over the
    # whole batch, support sets per domain.
    "arm": ("arm", {}, {}),
    # A network with dropout: each run its own rate (0 among them).
    "erm_dropout": ("erm", {}, {}),
}
DROPOUT_RATES = (0.5, 0.0)
# On 2 devices: one case per way a step can depend on the batch's layout
# (a penalty's per-domain statistics, per-domain gradients, domain blocks,
# random draws per example, own networks, pairs of examples across the
# batch); SD, IB_ERM, IB_IRM, IGA, SAND-mask, CDANN, CausIRL_MMD and CondCAD
# share theirs with fishr, andmask, dann, CausIRL_CORAL (random cuts inside
# each domain) and CAD.
TWO_DEVICE_CASES = tuple(c for c in CASES if c not in (
    "sd", "ib_erm", "ib_irm", "iga", "sandmask", "cdann", "causirl_mmd",
    "condcad"))


def run_hparams(case: str, run: int) -> train.StepSpec:
  name, fixed, per_run = CASES[case]
  config = registry.get(name).config_class(
      **fixed, **{k: v[run] for k, v in per_run.items()})
  schedule = base.Schedule(penalty_anneal_iters=ANNEALS[run],
                           penalty_warmup_weight=WARMUPS[run],
                           reset_optimizer_at_anneal=True)
  return train.StepSpec(
      config, schedule, LRS[run], WEIGHT_DECAYS[run],
      dropout_rate=DROPOUT_RATES[run] if case == "erm_dropout" else 0.0)


def make_batch(run: int, case: str = "erm") -> dict[str, np.ndarray]:
  rng = np.random.default_rng(run)
  n = NUM_DOMAINS * PER_DOMAIN
  x = rng.normal(size=(n, 10)).astype(np.float32)
  if case == "arm":  # its context network reads images
    x = x.reshape(n, 5, 2, 1)
  return {"x": x,
          "y": rng.integers(0, 4, n).astype(np.int32),
          "domain": np.repeat(np.arange(NUM_DOMAINS, dtype=np.int32),
                              PER_DOMAIN)}


MODULE = models.MLP(hidden_dims=(16,), num_outputs=4)


class DropoutMLP(nn.Module):
  """A hidden layer, dropout on its features, a linear head."""
  rate: float = 0.0

  def setup(self):
    self.hidden = nn.Dense(16)
    self.dropout = models.Dropout(self.rate)
    self.head = nn.Dense(4, name=models.HEAD)

  def __call__(self, x, deterministic=True):
    features = self.dropout(models.relu(self.hidden(x)), deterministic)
    return features, self.head(features)

  def classify(self, features):
    return self.head(features)


def network(case: str, hparams: train.StepSpec) -> algorithms.Network:
  if case == "erm_dropout":
    return algorithms.Network.from_module(
        DropoutMLP(hparams.dropout_rate), stochastic=True)
  return algorithms.Network.from_module(MODULE)


def factory(case: str) -> train.AlgorithmFactory:
  name = CASES[case][0]
  return lambda hparams, mesh=None: algorithms.make_algorithm(
      name, network(case, hparams), NUM_DOMAINS, hparams.algorithm,
      hparams.schedule, mesh)


def initial_state(case: str, run: int, hparams: train.StepSpec
                  ) -> train.TrainState:
  batch = make_batch(run, case)
  module = DropoutMLP() if case == "erm_dropout" else MODULE
  params = module.init(jax.random.key(100 + run), algorithms.network_input(
      CASES[case][0], batch["x"][:1]))["params"]
  algorithm = factory(case)(hparams)
  tx = optimizers.make(hparams.optimizer, hparams.lr, hparams.weight_decay)
  return train.create_train_state(jax.random.key(200 + run), params, algorithm,
                                  tx, batch)


def alone(case: str, run: int, data_shards: int = 1
          ) -> tuple[train.TrainState, tuple]:
  """Run `run` trained by itself (one device, no mesh). With dropout its
  examples come in the order a program over `data_shards` devices lays them
  out (parallel.spread_domains), so that its masks fall on the same ones.
  Trained once per process (read only): every mesh compares against it."""
  return _alone(case, run, data_shards if case == "erm_dropout" else 1)


@functools.cache
def _alone(case: str, run: int, data_shards: int
           ) -> tuple[train.TrainState, tuple]:
  hparams = run_hparams(case, run)
  algorithm = factory(case)(hparams)
  tx = optimizers.make(hparams.optimizer, hparams.lr, hparams.weight_decay)
  step = jax.jit(train.make_train_step(algorithm, tx, hparams.schedule))
  state, batch = initial_state(case, run, hparams), make_batch(run, case)
  if case == "erm_dropout":
    order = parallel.spread_domains(batch["domain"], data_shards)
    batch = {k: v[order] for k, v in batch.items()}
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, tuple(losses)


def together(case: str, runs: list[int], mesh) -> tuple[train.TrainState, list]:
  """`runs` trained as one program on `mesh` (parallel.make_runs_mesh)."""
  hparams = [run_hparams(case, r) for r in runs]
  shared, varying = vectorized.split_hparams(hparams)
  step = vectorized.jit_train_step(
      vectorized.make_train_step(factory(case), shared, mesh), mesh)
  algorithm = factory(case)(shared, mesh)
  states = vectorized.stack(
      [initial_state(case, r, h) for r, h in zip(runs, hparams)], mesh)
  batch = parallel.shard_run_batches([make_batch(r, case) for r in runs], mesh,
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
    state, run_losses = alone(case, run, parallel.data_shards(mesh))
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


def colored_mnist_records(workdir: str, per_program: int,
                          group_step: str = "auto") -> list[list[dict]]:
  """The records of 3 Colored MNIST restarts (embedded digits, 4 steps),
  `per_program` to a program."""
  from configs import colored_mnist  # pylint: disable=g-import-not-at-top
  from fishr_jax import train_colored_mnist  # pylint: disable=g-import-not-at-top
  config = colored_mnist.get_config()
  config.update(restarts=3, steps=4, hidden_dim=8, log_every=2,
                checkpoint_every=2, penalty_anneal_iters=2,
                runs_per_program=per_program, group_step=group_step)
  folder = os.path.join(workdir, f"{group_step}_{per_program}")
  train_colored_mnist.train_and_evaluate(config, folder)
  return [workdir_lib.read_records(os.path.join(folder, f"restart_{r}"))
          for r in range(3)]


def colored_mnist_differences(alone_records: list[list[dict]],
                              group_records: list[list[dict]]
                              ) -> dict[str, float]:
  """The restarts 2 to a program against the restarts alone
  (colored_mnist_records' with per_program 2 and 1): the largest relative
  differences of their records' losses and accuracies."""
  worst = {"loss": 0.0, "step": 0}
  for alone_runs, group_runs in zip(alone_records, group_records):
    worst["step"] = max(worst["step"], abs(len(alone_runs) - len(group_runs)))
    for a, b in zip(alone_runs, group_runs):
      for key in ("loss", "nll", "train_acc", "test_acc"):
        worst["loss"] = max(worst["loss"], abs(a[key] - b[key]) /
                            max(abs(a[key]), 1e-3))
  return worst


def main(path: str, workdir: str) -> None:
  """Every case on 2 devices: runs over devices (2, 1), and each run's batch
  over devices (1, 2); and Colored MNIST restarts in groups."""
  assert len(jax.devices()) == 2, jax.devices()
  out = {f"{case} {shape}": largest_differences(
      case, [0, 1], parallel.make_runs_mesh(2, run_shards=shape[0]))
         for case in TWO_DEVICE_CASES for shape in ((2, 1), (1, 2))}
  # The restarts alone, once: group_step plays no part in them.
  alone_records = colored_mnist_records(workdir, 1)
  for group_step in ("vmap", "each"):
    out[f"colored_mnist {group_step}"] = colored_mnist_differences(
        alone_records, colored_mnist_records(workdir, 2, group_step))
  with open(path, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  import chex  # pylint: disable=g-import-not-at-top
  chex.set_n_cpu_devices(2)
  main(sys.argv[1], sys.argv[2])
