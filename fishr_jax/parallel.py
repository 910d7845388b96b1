"""Data parallelism over a 1-D device mesh, with one jit.

The train step is written on the GLOBAL batch, so sharding is only a layout:
the batch's leading axis is split over the mesh's "data" axis, everything else
(params, optimizer and algorithm state) is replicated, and XLA inserts the
all-reduces that the per-domain sums need. The per-domain gradient variances,
their moving average and the penalty are therefore those of the global batch,
and a run on n devices equals the one-device run up to float summation order
(tests/test_parallel.py checks 1, 2, 4 and 8 devices). A step whose
algorithm relies on the loaders' layout (fast_paths' domain blocks) is built
for its mesh (`algorithms.make_algorithm(..., mesh=mesh)`), and
`shard_batch(..., domain_blocks=True)` checks the layout as it makes the
batch.

Multi-host: set `config.distributed=True` to call `jax.distributed.initialize`
(its arguments come from the cluster's environment: SLURM, TPU pods, or
JAX_COORDINATOR_ADDRESS etc.). Each process then loads its own part of the
batch and `shard_batch` assembles the global array from the parts.
"""

import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fishr_jax import errors

DATA_AXIS = "data"
RUNS_AXIS = "runs"  # vectorized runs (vectorized.py): one run per index
PyTree = Any


def initialize(config: ml_collections.ConfigDict) -> None:
  """Joins the multi-process job if `config.distributed`; a no-op otherwise.

  The job's shape comes from the cluster (SLURM, TPU pods: JAX detects it)
  or from the environment: JAX_COORDINATOR_ADDRESS (host:port of process
  0), JAX_NUM_PROCESSES and JAX_PROCESS_ID. CPU processes exchange their
  all-reduces through gloo.
  """
  if not config.get("distributed", False):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  env = {key: int(os.environ[name]) for key, name in (
      ("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
         if name in os.environ}
  jax.distributed.initialize(**env)


# How a dead peer shows in a collective's error (gloo on CPU; the
# coordination service everywhere).
_PEER_FAILURES = ("Connection closed by peer", "heartbeat timeout",
                  "Connection reset by peer")


def is_multi_process() -> bool:
  """Whether this process is one of several (False if JAX cannot start)."""
  try:
    return jax.process_count() > 1
  except Exception:  # pylint: disable=broad-except
    return False


def is_primary() -> bool:
  """Whether this process writes the run folder's files: process 0 of a
  multi-process job (every process trains and checkpoints its part)."""
  return jax.process_index() == 0


def is_peer_failure(error: BaseException) -> bool:
  """Whether `error` says that another process of this job died."""
  return is_multi_process() and any(
      text in str(error) for text in _PEER_FAILURES)


def _first_devices(num_devices: int) -> list[jax.Device]:
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise errors.ConfigError(f"num_devices={num_devices}, but there are "
                             f"{len(devices)} devices: {devices}.")
  return devices[:num_devices or len(devices)]


def make_mesh(num_devices: int = 0) -> Mesh:
  """A data-parallel mesh over the first `num_devices` devices (0: all of
  them, across every process)."""
  devices = _first_devices(num_devices)
  num_devices = len(devices)
  # Auto axes: the step is global-batch code and XLA's sharding propagation
  # places the all-reduces (Explicit axes would ask every contraction over
  # the batch for an output sharding).
  return jax.make_mesh((num_devices,), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def make_runs_mesh(num_runs: int, num_devices: int = 0,
                   run_shards: int | None = None) -> Mesh:
  """A 2-D mesh (RUNS_AXIS, DATA_AXIS) for `num_runs` runs trained as one
  program: the runs split over `run_shards` devices (None: as many as
  divide both, since runs need no communication), each run's batch over
  the rest."""
  devices = _first_devices(num_devices)
  if run_shards is None:
    run_shards = math.gcd(num_runs, len(devices))
  if num_runs % run_shards or len(devices) % run_shards:
    raise errors.ConfigError(
        f"{num_runs} runs on {len(devices)} devices cannot be split over "
        f"{run_shards} run shards.")
  return jax.make_mesh((run_shards, len(devices) // run_shards),
                       (RUNS_AXIS, DATA_AXIS),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def run_sharding(mesh: Mesh) -> NamedSharding:
  """Arrays with a leading run axis, on a `make_runs_mesh` mesh."""
  return NamedSharding(mesh, PartitionSpec(RUNS_AXIS))


def data_shards(mesh: Mesh | None) -> int:
  """How many parts each run's batch is split into on `mesh` (None: 1)."""
  return 1 if mesh is None else mesh.shape[DATA_AXIS]


def must_block_each_step(mesh: Mesh) -> bool:
  """Whether a loop must wait for each step before dispatching the next.

  XLA:CPU runs every device's part of a program on one shared thread pool.
  With several CPU devices (fake ones: more devices than cores), a step
  dispatched while the previous one runs can take the threads that the
  previous step's all-reduce is waiting for, and both wait for ever (seen on
  4 fake devices over 2 cores). Accelerators keep dispatch asynchronous."""
  return mesh.devices.flat[0].platform == "cpu" and mesh.size > 1


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Params and states: one full copy on every device. In a multi-process
  job every process holds the same values and builds its devices' copies
  (device_put cannot place data on another process's devices)."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def global_copy(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(global_copy(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: host[index])

  return jax.tree.map(global_copy, tree)


def spread_domains(domain_ids: np.ndarray, num_shards: int) -> np.ndarray:
  """A permutation of the batch that gives every shard a near-equal slice of
  every domain (each domain's examples keep their order).

  Batches come domain by domain; cut into contiguous shards, each device would
  hold one domain and its compute would not balance. Ordering by the rank of
  each example within its own domain, as a fraction of the domain's size,
  spreads the domains evenly. When the shards divide every domain exactly,
  each shard's slice is laid out domain by domain, as the loaders lay out a
  batch, so Fishr's closed form takes its block sums on every device
  (penalties.dense_grad_variance); otherwise the domains are interleaved.
  """
  domain_ids = np.asarray(domain_ids)
  if domain_ids.ndim != 1:
    raise ValueError(f"domain ids must be 1-D, got shape {domain_ids.shape}.")
  if len(domain_ids) % num_shards:
    raise ValueError(f"A batch of {len(domain_ids)} examples cannot be split "
                     f"evenly over {num_shards} devices; pick a batch size "
                     "(or num_devices) that divides it.")
  if num_shards == 1:  # keep the loaders' layout (and its fast block sums)
    return np.arange(len(domain_ids))
  _, inverse, counts = np.unique(domain_ids, return_inverse=True,
                                 return_counts=True)
  rank = np.zeros(len(domain_ids))
  for d, count in enumerate(counts):
    members = np.flatnonzero(inverse == d)
    rank[members] = (np.arange(count) + 0.5) / count
  if np.all(counts % num_shards == 0):
    shard = np.floor(rank * num_shards)
    return np.lexsort((rank, domain_ids, shard))
  return np.lexsort((domain_ids, rank))


def process_part(batch: dict[str, np.ndarray],
                 process_index: int | None = None,
                 process_count: int | None = None) -> dict[str, np.ndarray]:
  """This process's part of a global host batch that every process built
  alike (Colored MNIST's full batch): a near-equal slice of every domain.
  Single-process runs get the batch back unchanged."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if count == 1:
    return batch
  order = spread_domains(batch["domain"], count)
  mine = np.array_split(order, count)[index]
  return {k: np.asarray(v)[np.sort(mine)] for k, v in batch.items()}


def check_domain_blocks(domain_ids: np.ndarray, num_domains: int,
                        num_shards: int) -> None:
  """Raises unless each of the `num_shards` equal slices of `domain_ids`
  holds `num_domains` equal blocks in domain order: [0]*B + [1]*B + ...,
  the layout fast_paths.blocked_dense_grad_variance relies on."""
  domain_ids = np.asarray(domain_ids)
  n = len(domain_ids)
  if n % (num_domains * num_shards) == 0:
    block = np.repeat(np.arange(num_domains), n // (num_domains * num_shards))
    if np.array_equal(domain_ids, np.tile(block, num_shards)):
      return
  counts = np.bincount(domain_ids, minlength=num_domains).tolist()
  raise ValueError(
      f"This batch (domain sizes {counts}, {num_shards} device shard(s)) is "
      f"not laid out in {num_domains} equal domain blocks per shard, which "
      "fishr.moment_sums='auto'/'domain_blocks' needs: give every training "
      "domain the same batch size, divisible by the number of devices, or set "
      "--config.fishr.moment_sums=reference (any layout).")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh,
                domain_blocks: bool = False,
                num_domains: int | None = None) -> dict[str, jax.Array]:
  """A host batch (in a multi-host job: this process's part) as one global
  array sharded over the mesh's data axis, every domain spread over the
  devices. The examples are permuted, which no algorithm depends on: they
  find each domain through batch["domain"]. `domain_blocks`: the algorithm
  relies on the loaders' layout (`Algorithm.needs_domain_blocks`), checked
  here for `num_domains` domains."""
  local_shards = len(mesh.local_devices)
  order = spread_domains(batch["domain"], local_shards)
  if domain_blocks:
    if num_domains is None:
      raise ValueError("shard_batch(domain_blocks=True) needs num_domains.")
    check_domain_blocks(np.asarray(batch["domain"])[order], num_domains,
                        local_shards)
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding,
                                                    np.asarray(v)[order])
          for k, v in batch.items()}


def shard_run_batches(batches: list[dict[str, np.ndarray]], mesh: Mesh,
                      domain_blocks: bool = False,
                      num_domains: int | None = None) -> dict[str, jax.Array]:
  """The host batches of K runs (one process) as one (K, N, ...) batch on a
  `make_runs_mesh` mesh: runs over its run axis, each run's examples over
  its data axis, laid out as `shard_batch` lays out one run's."""
  if jax.process_count() > 1:
    raise errors.ConfigError("Vectorized runs (runs_per_program > 1) train in "
                             "one process; drop distributed=True.")
  shards = data_shards(mesh)
  ordered = []
  for batch in batches:
    order = spread_domains(batch["domain"], shards)
    if domain_blocks:
      if num_domains is None:
        raise ValueError("shard_run_batches(domain_blocks=True) needs "
                         "num_domains.")
      check_domain_blocks(np.asarray(batch["domain"])[order], num_domains,
                          shards)
    ordered.append({k: np.asarray(v)[order] for k, v in batch.items()})
  sharding = NamedSharding(mesh, PartitionSpec(RUNS_AXIS, DATA_AXIS))
  return {k: jax.device_put(np.stack([b[k] for b in ordered]), sharding)
          for k in ordered[0]}
