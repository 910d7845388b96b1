"""Trains every Fishr variant and ablation on the embedded digits (Colored
MNIST, a short schedule) through every path that computes it, on meshes of 1
and 4 fake CPU devices, and writes each run's final record to a JSON file
(tests/test_variant_paths.py compares them).

Run in its own process: the device count is fixed when JAX starts.
  python tests/variant_paths_run.py OUT.json WORKDIR
"""

import json
import os
import sys

import chex

from configs import colored_mnist as cmnist_config  # noqa: E402
from fishr_jax import train  # noqa: E402
from fishr_jax import train_colored_mnist  # noqa: E402

# variant: fishr options; paths: name -> the options that pick it.
VARIANTS = {
    "default": {},
    "not_centered": {"centered": False},
    "all_layers": {"params": "all"},
    "covariance": {"covariance": "full", "grad_path": "vmap"},
}
PATHS = {
    "closed_form": {"grad_path": "closed_form", "moment_sums": "reference"},
    "closed_form_fast": {"grad_path": "closed_form", "moment_sums": "auto"},
    "vmap": {"grad_path": "vmap"},
}
DEVICES = (1, 4)


def paths_of(variant: str) -> list[str]:
  return ["vmap"] if variant == "covariance" else list(PATHS)


def run(variant: str, path: str, num_devices: int, workdir: str) -> dict:
  config = cmnist_config.get_config()
  config.update(restarts=1, steps=31, hidden_dim=16, log_every=30,
                checkpoint_every=30, penalty_anneal_iters=10,
                num_devices=num_devices)
  config.fishr.update(PATHS[path])
  config.fishr.update(VARIANTS[variant])
  (run,) = list(train_colored_mnist.make_groups(config, workdir))
  return train.train_loop(run)[-1]


def main(out_path: str, workdir: str) -> None:
  results = {}
  for variant in VARIANTS:
    for path in paths_of(variant):
      for n in DEVICES:
        name = f"{variant}/{path}/{n}"
        record = run(variant, path, n, os.path.join(workdir, name))
        results[name] = {k: record[k] for k in
                         ("train_acc", "test_acc", "gray_acc", "penalty", "nll")}
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  # Here, not at import: the tests import this module for its names, and the
  # device count must not leak into their process.
  chex.set_n_cpu_devices(4)
  main(sys.argv[1], sys.argv[2])
