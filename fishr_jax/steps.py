"""The step builder: a run's jitted train step, its state at step 0 and its
batches' layout, from an algorithm factory, a StepSpec (the algorithm's
Config and Schedule, the optimizer) and a mesh. Both experiments, the
benchmark and the tests build their steps here.

  built = steps.build(make_algorithm, spec, parallel.make_mesh(n), num_domains)
  state = built.init_state(rng, params, batch)
  state, metrics = built.step(state, built.shard(host_batch))

With `runs=True`, on a `parallel.make_runs_mesh` mesh, it builds the step
of K runs as one program (vectorized.py): `step(states, batches, values)`
with the values in which the runs differ (vectorized.split_hparams), and
`shard` takes the K runs' host batches; `init_state` then gives one run's
state on the mesh's first device, for vectorized.stack.
"""

import dataclasses
from typing import Any, Callable

import jax

from fishr_jax import optimizers
from fishr_jax import parallel
from fishr_jax import train
from fishr_jax import vectorized

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BuiltStep:
  """What `build` gives.

  step: the jitted step (`runs`: vectorized.VectorizedStep).
  init_state: (rng, params, batch) -> the state at step 0, laid out for
    `step` (`runs`: one run's, on the first device).
  shard: a host batch (`runs`: a list, one per run) -> the step's batch,
    checked against the algorithm's layout (`needs_domain_blocks`).
  """
  step: Callable
  init_state: Callable[[jax.Array, PyTree, train.Batch], train.TrainState]
  shard: Callable[[Any], train.Batch]
  needs_domain_blocks: bool


def build(make_algorithm: train.AlgorithmFactory, spec: train.StepSpec,
          mesh: jax.sharding.Mesh, num_domains: int, *, runs: bool = False,
          xla_cpu_dot_fusion: bool = True) -> BuiltStep:
  """The step of a run (or, `runs`, of K runs that share `spec`'s
  non-scalar fields) on `mesh`; see the module docstring."""
  algorithm = make_algorithm(spec, mesh)
  tx = optimizers.make(spec.optimizer, spec.lr, spec.weight_decay)
  blocks = algorithm.needs_domain_blocks

  def init_state(rng, params, batch):
    state = train.create_train_state(rng, params, algorithm, tx, batch)
    if runs:
      return jax.device_put(state, mesh.devices.flat[0])
    return parallel.replicate(state, mesh)

  if runs:
    step = vectorized.jit_train_step(
        vectorized.make_train_step(make_algorithm, spec, mesh), mesh,
        xla_cpu_dot_fusion)
    shard = lambda batches: parallel.shard_run_batches(batches, mesh, blocks,
                                                       num_domains)
  else:
    step = train.jit_train_step(
        train.make_train_step(algorithm, tx, spec.schedule), mesh,
        xla_cpu_dot_fusion)
    shard = lambda batch: parallel.shard_batch(batch, mesh, blocks,
                                               num_domains)
  return BuiltStep(step, init_state, shard, blocks)
