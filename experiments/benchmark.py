"""Step time and peak memory of ERM vs Fishr, in one run.

  python -m experiments.benchmark --output_dir runs/benchmark

For each setting, jits the full train step of ERM, Fishr with the closed-form
head variance and Fishr with jax.vmap(jax.grad) over the head, times the
median of --repeats steps after --warmup steps (interleaving the algorithms
round by round so machine noise hits all of them alike), reads the compiled
step's memory from XLA's memory analysis, and writes benchmark.md and
benchmark.json with Fishr/ERM ratios. Runs on whatever backend JAX finds.

Settings:
  colored_mnist_full_batch  MLP 392-390-390-1 on 2 x 25,000 random inputs
                            (the full-MNIST Colored MNIST batch).
  domainbed_mnist_cnn       DomainBed's MNIST_CNN, 3 domains x 64, 10 classes.
Pass setting names as arguments to run only those.
"""

import json
import os
import platform
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from configs import colored_mnist as cmnist_config
from fishr_jax import algorithms
from fishr_jax import models
from fishr_jax import train

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/benchmark", "Output folder.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed steps per algorithm.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")

VARIANTS = {
    "erm": ("erm", {}),
    "fishr_closed_form": ("fishr", {"grad_path": "closed_form"}),
    "fishr_vmap": ("fishr", {"grad_path": "vmap"}),
}


def colored_mnist_full_batch() -> dict[str, Any]:
  n_per_domain, num_domains = 25000, 2
  rng = np.random.default_rng(0)
  n = n_per_domain * num_domains
  batch = {"x": rng.random((n, 14, 14, 2), np.float32),
           "y": rng.integers(0, 2, n).astype(np.float32),
           "domain": np.repeat(np.arange(num_domains, dtype=np.int32), n_per_domain)}
  config = cmnist_config.get_config("paper")
  config.penalty_anneal_iters = 0  # time the step with the penalty on
  return {"model": models.MLP(hidden_dims=(390, 390), num_outputs=1),
          "batch": batch, "num_domains": num_domains, "config": config,
          "description": "Colored MNIST full batch, 2 x 25,000, MLP 390"}


def domainbed_mnist_cnn() -> dict[str, Any]:
  n_per_domain, num_domains, num_classes = 64, 3, 10
  rng = np.random.default_rng(0)
  n = n_per_domain * num_domains
  batch = {"x": rng.random((n, 28, 28, 1), np.float32),
           "y": rng.integers(0, num_classes, n).astype(np.int32),
           "domain": np.repeat(np.arange(num_domains, dtype=np.int32), n_per_domain)}
  config = cmnist_config.get_config()
  config.update(l2_regularizer_weight=0.0, penalty_anneal_iters=0,
                penalty_warmup_weight=0.0, rescale_loss=False)
  config.fishr.update(lambda_=1000.0, ema=0.95, reduction="mean")
  return {"model": models.MNISTCNN(num_outputs=num_classes), "batch": batch,
          "num_domains": num_domains, "config": config,
          "description": "DomainBed MNIST_CNN, 3 x 64, 10 classes"}


SETTINGS: dict[str, Callable[[], dict[str, Any]]] = {
    "colored_mnist_full_batch": colored_mnist_full_batch,
    "domainbed_mnist_cnn": domainbed_mnist_cnn,
}


def compile_step(setting: dict[str, Any], variant: str):
  name, fishr_overrides = VARIANTS[variant]
  config = setting["config"].copy_and_resolve_references()
  config.fishr.update(fishr_overrides)
  algorithm = algorithms.make_algorithm(name, setting["model"],
                                        setting["num_domains"], config)
  tx = train.make_optimizer(config)
  batch = jax.device_put(setting["batch"])
  params = setting["model"].init(jax.random.key(1), batch["x"][:1])["params"]
  state = train.create_train_state(jax.random.key(0), params, algorithm, tx, batch)
  step = jax.jit(train.make_train_step(algorithm, tx, config), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  peak = None
  if memory is not None:
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return compiled, state, batch, peak


def benchmark_setting(setting: dict[str, Any], variants: Sequence[str]) -> dict[str, Any]:
  runs = {v: compile_step(setting, v) for v in variants}
  states = {v: runs[v][1] for v in variants}
  for v in variants:
    for _ in range(_WARMUP.value):
      states[v], _ = runs[v][0](states[v], runs[v][2])
    jax.block_until_ready(states[v])
  times = {v: [] for v in variants}
  for _ in range(_REPEATS.value):
    for v in variants:
      start = time.perf_counter()
      states[v], metrics = runs[v][0](states[v], runs[v][2])
      jax.block_until_ready((states[v], metrics))
      times[v].append(time.perf_counter() - start)
  out = {v: {"step_time_s": float(np.median(times[v])),
             "peak_memory_bytes": runs[v][3]} for v in variants}
  erm = out["erm"]
  for v in variants:
    out[v]["time_ratio_vs_erm"] = out[v]["step_time_s"] / erm["step_time_s"]
    if out[v]["peak_memory_bytes"] and erm["peak_memory_bytes"]:
      out[v]["memory_ratio_vs_erm"] = (out[v]["peak_memory_bytes"]
                                       / erm["peak_memory_bytes"])
  return out


def device_description() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  return f"{device.platform.upper()} {device.device_kind} x{jax.device_count()}"


def markdown(results: dict[str, Any], device: str) -> str:
  lines = [f"Device: {device}. Median of {_REPEATS.value} steps after warm-up; "
           "memory from XLA's memory analysis of the compiled step.", "",
           "| setting | algorithm | step time (ms) | vs ERM | peak memory (MiB) | vs ERM |",
           "|---|---|---|---|---|---|"]
  for setting, rows in results.items():
    for variant, r in rows.items():
      mem = r["peak_memory_bytes"]
      lines.append(
          f"| {setting} | {variant} | {1e3 * r['step_time_s']:.1f} | "
          f"{r['time_ratio_vs_erm']:.3f} | "
          f"{'n/a' if mem is None else f'{mem / 2**20:.1f}'} | "
          f"{r.get('memory_ratio_vs_erm', float('nan')):.3f} |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  settings = argv[1:] or list(SETTINGS)
  results = {}
  for name in settings:
    setting = SETTINGS[name]()
    print(f"benchmarking {setting['description']} ...", flush=True)
    results[name] = benchmark_setting(setting, list(VARIANTS))
  device = device_description()
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  table = markdown(results, device)
  with open(os.path.join(_OUTPUT_DIR.value, "benchmark.md"), "w") as f:
    f.write(table)
  with open(os.path.join(_OUTPUT_DIR.value, "benchmark.json"), "w") as f:
    json.dump({"device": device, "jax": jax.__version__, "results": results}, f,
              indent=2)
  print(table)


if __name__ == "__main__":
  app.run(main)
