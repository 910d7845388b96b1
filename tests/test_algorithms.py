"""Every registered algorithm, under both experiments: built by each
experiment's adapter (algorithms/settings.py), trained one step through the
train loop on tiny real digits, with a finite loss, and its whole train state
(parameters, optimizer, algorithm state, rng) round-trips through a
checkpoint. A new algorithm module is picked up here from the registry."""

import dataclasses
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import colored_mnist as cmnist_config
from configs import domainbed as domainbed_config
from fishr_jax import algorithms
from fishr_jax import evaluation
from fishr_jax import hparams as hparams_lib
from fishr_jax import losses
from fishr_jax import models
from fishr_jax import train
from fishr_jax import train_colored_mnist
from fishr_jax import train_domainbed
from fishr_jax.algorithms import causirl as causirl_lib
from fishr_jax.algorithms import mtl as mtl_lib
from fishr_jax.algorithms import registry
from fishr_jax.algorithms import settings

# DomainBed's MNIST_CNN compiles in seconds per algorithm: the slow half.
EXPERIMENTS = ("colored_mnist", pytest.param("domainbed",
                                             marks=pytest.mark.slow))


def _make_run(experiment, name, digits_dir, workdir):
  if experiment == "colored_mnist":
    config = cmnist_config.get_config()
    config.update(algorithm=name, restarts=1, steps=1, hidden_dim=8,
                  log_every=1, checkpoint_every=1)
    config.data.update(source="idx", data_dir=digits_dir)
    return next(train_colored_mnist.make_groups(config, workdir))
  config = domainbed_config.get_config()
  config.update(algorithm=name, steps=1, checkpoint_freq=1,
                digits_source="idx", data_dir=digits_dir, eval_batch_size=512)
  config.hparams.batch_size = 8
  return train_domainbed.make_run(config, workdir)


def _host(state):
  return jax.device_get(state.replace(rng=jax.random.key_data(state.rng)))


@pytest.mark.parametrize("name", algorithms.names())
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_algorithm_trains_and_checkpoints(experiment, name,
                                                tiny_mnist_dir, tmp_path):
  run = _make_run(experiment, name, tiny_mnist_dir, str(tmp_path))
  template = jax.tree.map(jnp.copy, run.state)  # the step donates its input
  expected, _ = run.train_step(jax.tree.map(jnp.copy, run.state),
                               next(run.batches(0)))
  records = train.train_loop(run)
  assert [r["step"] for r in records] == [0]
  assert np.isfinite(records[0]["loss"]) and np.isfinite(records[0]["nll"])
  assert os.path.exists(os.path.join(run.workdir, train.DONE))

  restored, _ = run.folder().resume(template)
  assert int(restored.step) == 1
  chex.assert_trees_all_equal(_host(restored), _host(expected))


@pytest.mark.parametrize("name", algorithms.names())
def test_every_algorithm_has_a_frozen_config_and_domainbed_mapping(name):
  entry = registry.get(name)
  config = entry.config_class()
  with pytest.raises(dataclasses.FrozenInstanceError):
    setattr(config, "x", 1)
  hparams = {k: default for k, (default, _)
             in hparams_lib.specs(name, "ColoredMNIST").items()}
  from_hparams, schedule = settings.from_domainbed(name, hparams)
  assert isinstance(from_hparams, entry.config_class)
  assert isinstance(schedule, algorithms.Schedule)
  # Every option no hparam sets can be given on DomainBed's command line.
  options = settings.domainbed_options(name)
  assert set(options) | set(entry.domainbed.to_config(hparams)) == {
      f.name for f in dataclasses.fields(entry.config_class)}
  # ...and every field on Colored MNIST's, with the Config's defaults.
  block = cmnist_config.get_config()[name]
  assert set(block) == {f.name for f in dataclasses.fields(entry.config_class)}


def test_an_unknown_option_is_named():
  config = cmnist_config.get_config()
  config.fishr.lamda = 3.0
  with pytest.raises(ValueError, match=r"fishr has no option \['lamda'\]"):
    settings.from_config_dict(config)
  with pytest.raises(ValueError, match="set by DomainBed hparams"):
    settings.from_domainbed("fishr", {"lambda": 1.0, "ema": 0.9,
                                      "penalty_anneal_iters": 0},
                            {"lambda_": 5.0})


class _TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    features = nn.relu(nn.Dense(4)(x))
    return features, self.classify(features)

  def classify(self, features):
    return nn.Dense(3, name=models.HEAD)(features)


def test_evaluation_scores_an_algorithms_own_predictions():
  """MTL predicts with noise beside the features, as DomainBed's predict
  does; evaluation scores that (reproducibly), any other algorithm the
  network's logits."""
  module = _TinyNet()
  x = jax.random.normal(jax.random.key(1), (6, 5))
  batch = {"x": x, "y": jnp.arange(6) % 3, "domain": jnp.arange(6) % 2}
  network = algorithms.Network.from_module(module)
  params = module.init(jax.random.key(0), x)["params"]
  erm = algorithms.make_algorithm("erm", module, 2)
  valid = jnp.ones(6, bool)
  np.testing.assert_array_equal(erm.logits_fn(network)(params, x, valid, None),
                                module.apply({"params": params}, x)[1])

  mtl = algorithms.make_algorithm("mtl", module, 2)
  params = mtl.init_params(jax.random.key(2), params, batch)
  rng = jax.random.key(evaluation.EVAL_KEY)
  features, logits = module.apply({"params": params}, x)
  noise = mtl_lib.draw_embedding_noise(rng, features.shape)
  np.testing.assert_allclose(
      mtl.logits_fn(network)(params, x, valid, rng),
      logits + noise @ params[mtl_lib.EMBEDDING_KERNEL], rtol=1e-6)
  assert not np.allclose(mtl.logits_fn(network)(params, x, valid, rng),
                         logits)
  # Its classifier starts as torch's Linear(2 D, C): U(+-1/sqrt(2 D)).
  bound = 1 / np.sqrt(2 * features.shape[-1])
  for leaf in (params[models.HEAD]["kernel"], params[models.HEAD]["bias"],
               params[mtl_lib.EMBEDDING_KERNEL]):
    assert np.abs(leaf).max() <= bound
  # Evaluation scores batch i with fold_in(key(EVAL_KEY), i), each batch
  # zero-padded to evaluation.padded_length rows (pad=False: as it comes).
  batches = [batch, {k: v[:3] for k, v in batch.items()}]

  def expected_accuracy(pad):
    correct = 0
    for i, b in enumerate(batches):
      n = len(b["y"])
      rows = evaluation.padded_length(n) if pad else n
      logits = mtl.logits_fn(network)(
          params, jnp.pad(b["x"], [(0, rows - n), (0, 0)]),
          jnp.arange(rows) < n,
          jax.random.fold_in(jax.random.key(evaluation.EVAL_KEY), i))
      correct += int(losses.correct(logits[:n], b["y"]).sum())
    return correct / sum(len(b["y"]) for b in batches)

  for pad in (True, False):
    accuracy = evaluation.make_accuracy_fn(mtl.logits_fn(network), pad=pad)
    assert accuracy(params, batches) == expected_accuracy(pad)


@pytest.mark.parametrize("name", ["causirl_coral", "causirl_mmd"])
@pytest.mark.parametrize("cuts", [(0, 0, 0), (1, 0, 0), (1, 1, 0)])
def test_causirl_without_two_examples_a_half_has_no_penalty(
    monkeypatch, name, cuts):
  """DomainBed's CausIRL penalty is 0 when a half has fewer than 2 examples
  (the first half of cuts (0, 0, 0) has none, of (1, 0, 0) one), with a
  finite gradient; otherwise it is the distance."""
  module = _TinyNet()
  x = jax.random.normal(jax.random.key(1), (12, 5))
  batch = {"x": x, "y": jnp.arange(12) % 3, "domain": jnp.arange(12) % 3}
  params = module.init(jax.random.key(0), x)["params"]
  monkeypatch.setattr(causirl_lib, "draw_cuts",
                      lambda rng, counts: jnp.asarray(cuts))
  algorithm = algorithms.make_algorithm(name, module, 3)
  grad_fn = jax.grad(algorithm.loss_fn, has_aux=True)
  grads, (_, metrics) = grad_fn(params, (), batch, jnp.int32(0),
                                jax.random.key(2))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  if sum(cuts) < 2:
    assert float(metrics["penalty"]) == 0.0
  else:
    assert float(metrics["penalty"]) > 0.0


@pytest.mark.parametrize("name", ["cad", "condcad"])
def test_cad_bottleneck_leaves_out_examples_without_a_partner(name):
  """An example with no other example of its label (CAD) or of its label in
  another domain (CondCAD) adds no term, as in DomainBed: all labels
  distinct gives a zero bottleneck with a finite gradient; one pair across
  domains gives a nonzero one."""
  module = _TinyNet()
  algorithm = algorithms.make_algorithm(name, module, 2)
  grad_fn = jax.grad(algorithm.loss_fn, has_aux=True)
  for labels, domains, nonzero in (([0, 1, 2], [0, 0, 1], False),
                                   ([0, 0, 0, 1], [0, 0, 1, 1], True)):
    x = jax.random.normal(jax.random.key(1), (len(labels), 5))
    params = module.init(jax.random.key(0), x)["params"]
    batch = {"x": x, "y": jnp.asarray(labels), "domain": jnp.asarray(domains)}
    grads, (_, metrics) = grad_fn(params, (), batch, jnp.int32(0),
                                  jax.random.key(2))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert (float(metrics["penalty"]) != 0.0) == nonzero, labels


@pytest.mark.perf
@pytest.mark.parametrize("name", algorithms.names())
@pytest.mark.parametrize("experiment", ["colored_mnist", "domainbed"])
def test_every_algorithms_cpu_step_keeps_the_dot_fusion(experiment, name,
                                                        tiny_mnist_dir,
                                                        tmp_path, capsys):
  """No algorithm's step has a fused dot that reads a broadcast, which
  XLA:CPU miscompiles and fast_paths.jit therefore compiles unfused, with a
  note (about 1.3x slower on CPU; docs/troubleshooting.md#known-xla-issue)."""
  run = _make_run(experiment, name, tiny_mnist_dir, str(tmp_path))
  compiled = run.train_step.lower(run.state, next(run.batches(0))).compile()
  assert "without XLA:CPU's dot fusion" not in capsys.readouterr().err
  assert "__ynn_fusion" in compiled.as_text()
