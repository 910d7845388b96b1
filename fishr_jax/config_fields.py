"""Config fields shared by every experiment config (configs/*.py).

In the library, not in configs/, so that a config file loaded by path (the
`fishr-jax` console script) imports it without configs/ on sys.path.
"""

from typing import Any

import ml_collections

from fishr_jax.algorithms import settings


def add_device_fields(config: ml_collections.ConfigDict) -> None:
  """Where and how the step runs (fishr_jax/parallel.py, fast_paths.py)."""
  # Data parallelism: devices of the mesh (0: all), and whether to join a
  # multi-host job first.
  config.num_devices = 0
  config.distributed = False
  # "bfloat16": the network computes in bfloat16 (GPU/TPU); parameters,
  # losses, Fishr's moments and its penalty stay float32.
  config.compute_dtype = "float32"
  # On CPU, compile the step with XLA's YNNPACK dot fusion.
  config.xla_cpu_dot_fusion = True
  # How runs trained together (vectorized.py) take a step: "vmap", one
  # program for all of them (accelerators); "each", a program of one run
  # called for each in turn (CPU, where batched operations over many runs
  # are slower); "auto" picks by backend.
  config.group_step = "auto"


def add_algorithm_blocks(config: ml_collections.ConfigDict,
                         overrides: dict[str, dict[str, Any]] | None = None,
                         only_unset: dict[str, tuple[str, ...]] | None = None
                         ) -> None:
  """One block per registered algorithm (config.fishr, config.irm, ...)."""
  for name, block in settings.config_blocks(overrides, only_unset).items():
    config[name] = block
