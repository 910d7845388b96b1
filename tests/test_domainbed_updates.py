"""fishr-jax's algorithms against DomainBed's own `update()`, step by step.

tests/data/domainbed_updates/<DomainBed name>.npz (+ .json) hold three
consecutive calls of DomainBed's update() in float64 on its MLP featurizer,
or MNIST_CNN for an algorithm that needs images (ARM)
(tools/make_domainbed_vectors.py; tests/data/README.md). Arrays too large
to store are rebuilt from the sidecar's seeds (`_seeded_array`) or compared
through stored random projections (`_projection`), by the generator's rules. For every
registered algorithm with such a file, `check_against_domainbed` builds the
same network in flax from the same initial weights, the algorithm exactly as
the DomainBed experiment does (settings.from_domainbed, optimizers.make,
train.create_train_state, train.make_train_step), runs three steps on the
same batches and compares every parameter after each step to DomainBed's.

What a new algorithm module may need to be picked up here:

- Random draws inside the step come from ONE module-level function, which
  the test replaces by DomainBed's recorded draws (`PINS`): Mixup
  `draw_pairs(rng, num_domains, alpha) -> (first (E,), lam (E,))`; MLDG
  `draw_domain_order(rng, num_domains) -> perm (E,)`; SagNet
  `draw_randomizations(rng, num_examples) -> (alpha (3, N), idx_swap (3, N))`;
  MTL `draw_embedding_noise(rng, shape) -> noise (N, W)`, batch order.
- DomainBed parameters beyond the featurizer and classifier (DANN's
  discriminator, SagNet's network_s, ...): the module defines
  `load_domainbed_extras(params, alg_state, extras) -> (params, alg_state)`
  (extras: {DomainBed name: torch-layout array}) and
  `domainbed_extras(params, alg_state) -> {DomainBed name: array}` (torch
  layout), compared after each step like the parameters. A module whose
  classifier is not the network's head alone (MTL's reads noise too) names
  the DomainBed prefixes it maps itself in `DOMAINBED_OWN_PARAMS`, and they
  go through the same two functions.
- Every DomainBed hparam of the algorithm has a DomainBedSpec entry of the
  same name (a missing one fails the test).
- A vector file with predict<N>.x / .logits (DomainBed's eval-mode
  predict() after the calls) is compared with `Algorithm.logits_fn` on that
  batch padded as evaluation pads it.
"""

import importlib
import inspect
import json
import os
import re
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import algorithms
from fishr_jax import evaluation
from fishr_jax import models
from fishr_jax import optimizers
from fishr_jax import train
from fishr_jax.algorithms import settings
from fishr_jax.data import domainbed
from tests.conftest import DATA_DIR

VECTORS = os.path.join(DATA_DIR, "domainbed_updates")
RTOL = 1e-8
# A looser bound for one algorithm, with the reason.
RTOL_FOR = {}

# Registered algorithms with no DomainBed counterpart: {name: reason}.
NO_DOMAINBED = {}
# Existing algorithms that do not reproduce DomainBed: {name: the difference}.
KNOWN_MISMATCHES = {}

# DomainBed hparams that are not the algorithm's own and that the harness
# reads itself; any other changed hparam must be the algorithm's own.
NETWORK_HPARAMS = ("mlp_width", "mlp_depth", "mlp_dropout")
OPTIMIZER_HPARAMS = ("lr", "weight_decay")

# Where the featurizer and the classifier live in each DomainBed class's
# state_dict (prefixes tried in order).
FEATURIZER_PREFIXES = ("featurizer.", "network_f.", "network.net.0.")
CLASSIFIER_PREFIXES = ("classifier.", "network_c.", "network.net.1.")

# DomainBed loss-dict entries that mean the same as a fishr-jax metric:
# {DomainBed name: {DomainBed key: fishr-jax metric}}. Not every entry means
# the same thing (CORAL's / MMD's 'loss' is the nll alone; VREx's 'nll' is
# the last domain's), so only these are compared.
LOSS_METRICS = {
    "ERM": {"loss": "loss"},
    "IRM": {"loss": "loss", "nll": "nll", "penalty": "penalty"},
    "VREx": {"loss": "loss", "penalty": "penalty"},
    "Fishr": {"loss": "loss", "nll": "nll", "penalty": "penalty"},
    "GroupDRO": {"loss": "loss"},
    "Mixup": {"loss": "loss"},
    "CORAL": {"loss": "nll", "penalty": "penalty"},
    "MMD": {"loss": "nll", "penalty": "penalty"},
    "MTL": {"loss": "loss"},
    # IB_ERM's 'nll' is the loss: `loss = nll; loss += ...` adds in place.
    "IB_ERM": {"loss": "loss", "IB_penalty": "penalty"},
    "IB_IRM": {"loss": "loss", "IRM_penalty": "irm_penalty",
               "IB_penalty": "ib_penalty"},
    "CausIRL_CORAL": {"loss": "nll", "penalty": "penalty"},
    "EQRM": {"loss": "loss"},
    "CAD": {"clf_loss": "nll", "bn_loss": "penalty", "total_loss": "loss"},
    "CondCAD": {"clf_loss": "nll", "bn_loss": "penalty",
                "total_loss": "loss"},
    "CausIRL_MMD": {"loss": "nll", "penalty": "penalty"},
}

# Algorithm state compared with DomainBed's buffers after each step:
# {DomainBed name: fn(alg_state) -> {"buffer.<name>": array}}.
STATE_CHECKS = {
    "GroupDRO": lambda q: {"buffer.q": q},
    "MTL": lambda embeddings: {"buffer.embeddings": embeddings},
}


# ------------------------------------------------------------------ network


class DomainBedMLP(nn.Module):
  """DomainBed's networks.MLP featurizer (mlp_dropout 0) and its linear
  classifier: Linear(in, w), ReLU, [Linear(w, w), ReLU] * (depth - 2),
  Linear(w, w) with no final ReLU; then the head named models.HEAD."""
  width: int
  depth: int
  num_classes: int

  def setup(self):
    self.input = nn.Dense(self.width)
    self.hiddens = [nn.Dense(self.width) for _ in range(self.depth - 2)]
    self.output = nn.Dense(self.width)
    setattr(self, models.HEAD, nn.Dense(self.num_classes))

  def __call__(self, x):
    h = nn.relu(self.input(x))
    for layer in self.hiddens:
      h = nn.relu(layer(h))
    features = self.output(h)
    return features, self.classify(features)

  def classify(self, features):
    return getattr(self, models.HEAD)(features)


def _flax_path(torch_name):
  """'featurizer.hiddens.0.weight' -> ('hiddens_0', 'kernel');
  MNIST_CNN's 'featurizer.conv1.weight' -> ('conv1', 'kernel'),
  'featurizer.bn0.weight' -> ('norm0', 'scale')."""
  for prefixes, head in ((FEATURIZER_PREFIXES, False),
                         (CLASSIFIER_PREFIXES, True)):
    for prefix in prefixes:
      if torch_name.startswith(prefix):
        rest = torch_name[len(prefix):]
        if head:
          layer, leaf = models.HEAD, rest
        else:
          cnn = re.fullmatch(r"(conv|bn)(\d)\.(weight|bias)", rest)
          if cnn is not None:
            if cnn.group(1) == "bn":
              return (f"norm{cnn.group(2)}",
                      {"weight": "scale", "bias": "bias"}[cnn.group(3)])
            return (f"conv{cnn.group(2)}",
                    {"weight": "kernel", "bias": "bias"}[cnn.group(3)])
          match = re.fullmatch(r"(input|output|hiddens\.(\d+))\.(weight|bias)",
                               rest)
          if match is None:
            return None
          layer = (match.group(1) if match.group(2) is None
                   else f"hiddens_{match.group(2)}")
          leaf = match.group(3)
        return layer, {"weight": "kernel", "bias": "bias"}[leaf]
  return None


def _to_flax(kernel):
  """A torch Linear (out, in) / Conv2d (out, in, kh, kw) weight as a flax
  kernel (in, out) / (kh, kw, in, out)."""
  return kernel.T if kernel.ndim == 2 else kernel.transpose(2, 3, 1, 0)


def _to_torch(kernel):
  return kernel.T if kernel.ndim == 2 else kernel.transpose(3, 2, 0, 1)


def _split_params(values, names, own_prefixes=()):
  """(flax params of the network, {DomainBed name: array} of the rest and of
  those under `own_prefixes`)."""
  params, extras = {}, {}
  for name in names:
    path = None if name.startswith(own_prefixes) else _flax_path(name)
    value = np.asarray(values[name])
    if path is None:
      extras[name] = value
      continue
    layer, leaf = path
    params.setdefault(layer, {})[leaf] = jnp.asarray(
        _to_flax(value) if leaf == "kernel" else value)
  return params, extras


def _torch_layout(params, names, own_prefixes=()):
  """{DomainBed name: array} of the network's params, torch layout."""
  out = {}
  for name in names:
    path = None if name.startswith(own_prefixes) else _flax_path(name)
    if path is None:
      continue
    layer, leaf = path
    value = np.asarray(params[layer][leaf])
    out[name] = _to_torch(value) if leaf == "kernel" else value
  return out


# ---------------------------------------------------------------- the files


def _files():
  if not os.path.isdir(VECTORS):
    return {}
  return {f[:-len(".npz")] for f in os.listdir(VECTORS) if f.endswith(".npz")}


def _seeded_array(spec):
  """The generator's `seeded_array`: the array a sidecar's "seeded" entry
  describes (its rule is in the sidecar's "large_arrays")."""
  rng = np.random.RandomState(spec["seed"])
  if spec["distribution"] == "normal":
    return rng.standard_normal(spec["shape"])
  return rng.uniform(-spec["bound"], spec["bound"], spec["shape"])


def _projection(name, value, meta):
  """The generator's `projection` of a parameter or buffer `name`."""
  value = np.asarray(value, np.float64).ravel()
  seed = zlib.crc32(("projection." + name).encode())
  matrix = np.random.RandomState(seed).standard_normal(
      (meta["large_arrays"]["projections"], value.size))
  return matrix @ value


def _load(domainbed_name, stored_only=False):
  """(arrays, sidecar); the seeded arrays rebuilt unless `stored_only`."""
  path = os.path.join(VECTORS, domainbed_name)
  with np.load(path + ".npz") as f:
    arrays = {k: f[k] for k in f.files}
  with open(path + ".json") as f:
    meta = json.load(f)
  if not stored_only:
    arrays.update({key: _seeded_array(spec)
                   for key, spec in meta.get("seeded", {}).items()})
  return arrays, meta


def _hparams(name, meta):
  """The hparams fishr-jax reads, checked against DomainBed's: every
  DomainBed hparam of the algorithm must have a fishr-jax counterpart."""
  spec = algorithms.get(name).domainbed
  hparams = meta["hparams"]
  dataset = meta["setup"]["hparams_registry_dataset"]
  own = spec.hparams_for(domainbed.dataset_spec(dataset).small_images)
  missing = sorted(set(meta["algorithm_hparams"]) - set(own))
  if missing:
    pytest.fail(f"{name}: DomainBed's {spec.name} hparams {missing} "
                f"(values {[hparams[h] for h in missing]}) have no fishr-jax "
                "counterpart in its DomainBedSpec.")
  unknown = sorted(set(own) - set(hparams))
  if unknown:
    pytest.fail(f"{name}: fishr-jax hparams {unknown} are not DomainBed's "
                f"{spec.name} hparams.")
  unread = sorted(set(meta["changed_from_defaults"]) - set(own)
                  - set(NETWORK_HPARAMS) - set(OPTIMIZER_HPARAMS))
  if unread:
    pytest.fail(f"{name}: the vectors change DomainBed hparams {unread} that "
                "this harness does not read.")
  if hparams["mlp_dropout"] or hparams["nonlinear_classifier"]:
    pytest.fail(f"{name}: the harness's network has no dropout and a linear "
                "classifier.")
  return {h: hparams[h] for h in (*own, *OPTIMIZER_HPARAMS, "batch_size")}


# -------------------------------------------------------------- draw pinning


def _pin_mixup(arrays, call):
  perm = arrays[f"call{call}.draw.randperm"][0]
  lam = arrays[f"call{call}.draw.beta"]

  def draw_pairs(rng, num_domains, alpha):
    del rng, alpha
    assert num_domains == len(perm)
    return jnp.asarray(perm), jnp.asarray(lam)
  return draw_pairs


def _pin_mldg(arrays, call):
  perm = arrays[f"call{call}.draw.randperm"][0]

  def draw_domain_order(rng, num_domains):
    del rng
    assert num_domains == len(perm)
    return jnp.asarray(perm)
  return draw_domain_order


def _pin_sagnet(arrays, call):
  alpha = arrays[f"call{call}.draw.rand"][..., 0]  # (3, N)
  idx_swap = arrays[f"call{call}.draw.randperm"]  # (3, N)

  def draw_randomizations(rng, num_examples):
    del rng
    assert num_examples == alpha.shape[1]
    return jnp.asarray(alpha), jnp.asarray(idx_swap)
  return draw_randomizations


def _pin_mtl(arrays, call):
  noise = arrays[f"call{call}.draw.normal_"]  # (E, B, W)
  noise = noise.reshape((-1, noise.shape[-1]))  # the batch's domain order

  def draw_embedding_noise(rng, shape):
    del rng
    assert tuple(shape) == noise.shape, (shape, noise.shape)
    return jnp.asarray(noise)
  return draw_embedding_noise


def _pin_causirl(arrays, call):
  cuts = arrays[f"call{call}.draw.randint"]  # (E,)

  def draw_cuts(rng, counts):
    del rng
    assert counts.shape == cuts.shape
    return jnp.asarray(cuts)
  return draw_cuts


# {DomainBed name: (the algorithm module's function, fn(arrays, call) -> its
# replacement returning that call's recorded draws)}.
PINS = {
    "Mixup": ("draw_pairs", _pin_mixup),
    "MLDG": ("draw_domain_order", _pin_mldg),
    "SagNet": ("draw_randomizations", _pin_sagnet),
    "MTL": ("draw_embedding_noise", _pin_mtl),
    "CausIRL_CORAL": ("draw_cuts", _pin_causirl),
    "CausIRL_MMD": ("draw_cuts", _pin_causirl),
}


# ------------------------------------------------------------------ harness


def _rel_error(actual, expected):
  """max |actual - expected| / max |expected|."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max()
               / max(np.abs(expected).max(), 1e-300))


def check_against_domainbed(name, monkeypatch):
  """Runs fishr-jax's `name` for DomainBed's three recorded calls; returns
  {what: max relative error} and fails on any above the bound."""
  entry = algorithms.get(name)
  domainbed_name = entry.domainbed.name
  arrays, meta = _load(domainbed_name)
  hparams = _hparams(name, meta)
  setup = meta["setup"]
  num_domains, calls = setup["num_domains"], setup["calls"]
  names = meta["parameters"]
  module_of = importlib.import_module(entry.make.__module__)
  own_prefixes = getattr(module_of, "DOMAINBED_OWN_PARAMS", ())

  init = {n: arrays[f"init.{n}"] for n in names}
  params, extras = _split_params(init, names, own_prefixes)
  if len(setup["input_shape"]) == 3:  # images: DomainBed's MNIST_CNN
    network = models.MNISTCNN(num_outputs=setup["num_classes"])
  else:
    network = DomainBedMLP(width=meta["hparams"]["mlp_width"],
                           depth=meta["hparams"]["mlp_depth"],
                           num_classes=setup["num_classes"])
  config, schedule = settings.from_domainbed(name, hparams)
  algorithm = algorithms.make_algorithm(name, network, num_domains, config,
                                        schedule)
  tx = optimizers.make(optimizers.ADAM, hparams["lr"], hparams["weight_decay"])

  def nhwc(x):  # torch's NCHW images as flax's NHWC
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x

  def batch_of(call):
    x, y = arrays[f"call{call}.x"], arrays[f"call{call}.y"]
    return {"x": jnp.asarray(nhwc(x.reshape((-1,) + x.shape[2:]))),
            "y": jnp.asarray(y.reshape(-1)),
            "domain": jnp.asarray(np.repeat(np.arange(num_domains),
                                            y.shape[1]))}

  if own_prefixes:  # the network's head is among them: whole before init
    params, _ = module_of.load_domainbed_extras(params, None, extras)
  state = train.create_train_state(jax.random.key(0), params, algorithm, tx,
                                   batch_of(0))
  if extras:
    if not hasattr(module_of, "load_domainbed_extras"):
      pytest.fail(f"{name}: DomainBed's {domainbed_name} has parameters "
                  f"{sorted(extras)} beyond the featurizer and classifier; "
                  f"{module_of.__name__} must define load_domainbed_extras "
                  "and domainbed_extras (see this file's docstring).")
    new_params, alg_state = module_of.load_domainbed_extras(
        state.params, state.alg_state, extras)
    state = state.replace(params=new_params, alg_state=alg_state,
                          opt_state=algorithm.fresh_optimizer(tx, new_params))

  pin = PINS.get(domainbed_name)
  if pin is None and any(".draw." in k for k in arrays):
    pytest.fail(f"{name}: DomainBed's update() drew random numbers; add a "
                "PINS entry.")
  if pin is not None:
    if not callable(getattr(module_of, pin[0], None)):
      pytest.fail(f"{name}: {module_of.__name__} must take its random draws "
                  f"from a module-level function {pin[0]} (PINS).")
    expected_args = list(inspect.signature(pin[1](arrays, 0)).parameters)
    actual_args = list(inspect.signature(getattr(module_of, pin[0])).parameters)
    assert actual_args == expected_args, (pin[0], actual_args)
    step = None  # re-traced per call: each call's draws are constants
  else:
    step = jax.jit(train.make_train_step(algorithm, tx, schedule))

  errors = {}
  for call in range(calls):
    if pin is not None:
      monkeypatch.setattr(module_of, pin[0], pin[1](arrays, call))
      step = jax.jit(train.make_train_step(algorithm, tx, schedule))
    state, metrics = step(state, batch_of(call))
    got = _torch_layout(state.params, names, own_prefixes)
    if extras:
      got.update(module_of.domainbed_extras(state.params, state.alg_state))
    for n in names:
      # A parameter DomainBed builds but never trains (DANN's class
      # embeddings) may be left out: it must keep its initial value there.
      value = got[n] if n in got else arrays[f"init.{n}"]
      if f"call{call}.projection.{n}" in arrays:
        errors[f"call{call}.projection.{n}"] = _rel_error(
            _projection(n, value, meta), arrays[f"call{call}.projection.{n}"])
      else:
        errors[f"call{call}.param.{n}"] = _rel_error(
            value, arrays[f"call{call}.param.{n}"])
    for n in sorted(set(got) - set(names)):  # buffers (ARM's running stats)
      if f"call{call}.buffer.{n}" in arrays:
        errors[f"call{call}.buffer.{n}"] = _rel_error(
            got[n], arrays[f"call{call}.buffer.{n}"])
      elif f"call{call}.projection.{n}" in arrays:
        errors[f"call{call}.projection.{n}"] = _rel_error(
            _projection(n, got[n], meta), arrays[f"call{call}.projection.{n}"])
      else:
        pytest.fail(f"{name}: domainbed_extras gives {n!r}, which "
                    f"{domainbed_name}'s vectors do not hold after {call}.")
    for key, value in STATE_CHECKS.get(domainbed_name,
                                       lambda s: {})(state.alg_state).items():
      errors[f"call{call}.{key}"] = _rel_error(value, arrays[f"call{call}.{key}"])
    for key, metric in LOSS_METRICS.get(domainbed_name, {}).items():
      errors[f"call{call}.loss.{key}"] = _rel_error(
          metrics[metric], arrays[f"call{call}.loss.{key}"])
  logits_fn = jax.jit(algorithm.logits_fn(algorithms.Network.from_module(
      network)))
  for key in sorted(k for k in arrays
                    if re.fullmatch(r"predict\d+\.logits", k)):
    x = nhwc(arrays[key[:-len(".logits")] + ".x"])
    n = len(x)
    pad = evaluation.padded_length(n) - n  # as evaluation pads
    x = np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    logits = logits_fn(state.params, x, np.arange(n + pad) < n,
                       jax.random.key(0))[:n]
    errors[key] = _rel_error(logits, arrays[key])
  bound = RTOL_FOR.get(name, RTOL)
  worst = max(errors, key=errors.get)
  print(f"{name} ({domainbed_name}): max relative error {errors[worst]:.3g} "
        f"at {worst}")
  bad = {k: v for k, v in errors.items() if not v <= bound}
  assert not bad, (f"{name} differs from DomainBed's {domainbed_name} beyond "
                   f"{bound}: {bad}")
  return errors


def _cases():
  cases = []
  for name in algorithms.names():
    marks = []
    if name in KNOWN_MISMATCHES:
      marks.append(pytest.mark.xfail(strict=True,
                                     reason=KNOWN_MISMATCHES[name]))
    cases.append(pytest.param(name, marks=marks))
  return cases


@pytest.mark.parametrize("name", _cases())
def test_algorithm_reproduces_domainbed_updates(x64, monkeypatch, name):
  if name in NO_DOMAINBED:
    pytest.skip(f"{name}: {NO_DOMAINBED[name]}")
  domainbed_name = algorithms.get(name).domainbed.name
  if domainbed_name not in _files():
    pytest.skip(f"no tests/data/domainbed_updates/{domainbed_name}.npz "
                "(test_every_algorithm_has_domainbed_vectors fails for it)")
  check_against_domainbed(name, monkeypatch)


@pytest.mark.parametrize("name", algorithms.names())
def test_every_algorithm_has_domainbed_vectors(name):
  if name in NO_DOMAINBED:
    pytest.skip(f"{name}: {NO_DOMAINBED[name]}")
  domainbed_name = algorithms.get(name).domainbed.name
  assert domainbed_name in _files(), (
      f"{name}: no tests/data/domainbed_updates/{domainbed_name}.npz; make it "
      "with tools/make_domainbed_vectors.py (its docstring).")


def test_vector_files_are_small_and_described():
  total = 0
  for domainbed_name in sorted(_files()):
    arrays, meta = _load(domainbed_name, stored_only=True)
    assert set(arrays) == set(meta["keys"]), domainbed_name
    for key, (dtype, shape) in meta["keys"].items():
      assert str(arrays[key].dtype) == dtype and list(arrays[key].shape) == shape
    assert re.fullmatch(r"[0-9a-f]{40}", meta["domainbed"]["commit"])
    total += sum(os.path.getsize(os.path.join(VECTORS, domainbed_name + ext))
                 for ext in (".npz", ".json"))
  assert total < 1_000_000


def test_mixup_draws_come_from_draw_pairs():
  """The refactor kept Mixup's draws: draw_pairs is what the loss uses."""
  from fishr_jax.algorithms import mixup  # pylint: disable=g-import-not-at-top
  rng = jax.random.key(3)
  perm_rng, lam_rng, _ = jax.random.split(rng, 3)
  first, lam = mixup.draw_pairs(rng, 3, 0.2)
  np.testing.assert_array_equal(first, jax.random.permutation(perm_rng, 3))
  np.testing.assert_array_equal(lam, jax.random.beta(lam_rng, 0.2, 0.2, (3,)))


