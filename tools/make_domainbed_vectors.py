"""Reference vectors from DomainBed's own `update()`: tests/data/domainbed_updates/.

Run (CPU torch, float64; DomainBed's Fishr needs backpack-for-pytorch):

  git --git-dir=/work/.mirror/facebookresearch+DomainBed/repo archive HEAD \
      | tar -x -C /tmp/domainbed_src      # (mkdir -p /tmp/domainbed_src first)
  /work/speed/torchvenv/bin/python tools/make_domainbed_vectors.py \
      --domainbed /tmp/domainbed_src --out tests/data/domainbed_updates

(`--algorithms ERM IRM ...` makes only those; `--commit HASH` names the
DomainBed commit in the sidecars when --domainbed is not a git checkout.)

For each algorithm it builds DomainBed's class (domainbed/algorithms.py, read
from --domainbed, never copied) on a vector input (its Featurizer is then
DomainBed's MLP; ARM, whose context network reads images, on (2, 28, 28)
inputs and so MNIST_CNN), with torch.set_default_dtype(torch.float64), from
torch.manual_seed(SEED) weights, and calls `update()` on CALLS different
minibatch lists. After each call it saves every parameter and buffer
(state_dict, DomainBed's names), every optimizer's Adam state, the returned
loss dict, the algorithm state that matters, and every random number
update() drew: torch.randperm, torch.rand, np.random.beta and
torch.Tensor.normal_ are wrapped while update() runs, and the call fails if
the torch or numpy RNG moved without one of them (apart from the algorithms
in RNG_USE_WITHOUT_DRAWS, whose reason is given). One .npz per algorithm,
with a .json sidecar naming every key, its shape and meaning, the DomainBed
commit, the hparams and this command. For the algorithms in PREDICT_SIZES
it also records, after the calls, `predict()` in eval mode on batches of
those sizes (ARM: its support sets and BatchNorm running statistics).

Arrays of more than LARGE elements (MNIST_CNN's and ARM's context network's
weights, image batches) would not fit the files' budget, so they are not
stored: such an input (an initial weight, a batch x) is drawn by
`seeded_array` from a numpy RandomState whose seed and rule the sidecar's
"seeded" entry gives (weights as torch's default init: U(-1/sqrt(fan_in),
1/sqrt(fan_in))), and loaded into DomainBed's module before the first call;
such a result (a parameter or buffer after a call) is stored as PROJECTIONS
random projections (`projection`: a seeded standard-normal matrix times the
flattened array), under call{k}.projection.<name>. The tests rebuild both
from the sidecar.

networks.py imports torchvision and timm at the top; neither is used by the
MLP featurizer, so when they are not installed empty stand-in modules are
registered (recorded in the sidecar).
"""

import argparse
import contextlib
import importlib
import json
import os
import shlex
import subprocess
import sys
import types
import zlib

import numpy as np
import torch

SEED = 0  # torch.manual_seed before building each algorithm (its weights)
DATA_SEED = 1  # np.random.RandomState of the minibatches
DRAW_SEED = 2  # np.random.seed before the first update (Mixup's np.random.beta)
INPUT_SHAPE = (6,)
# Algorithms that need images: their input shape (C, H, W).
IMAGE_INPUTS = {"ARM": (2, 28, 28)}
# Batch sizes of the eval-mode predict() recorded after the calls: ARM's 12
# (not a multiple of its support size 8: one support set) and 16 (two).
PREDICT_SIZES = {"ARM": (12, 16)}
NUM_CLASSES = 3
NUM_DOMAINS = 3
BATCH = 8  # examples per domain minibatch
CALLS = 3
LARGE = 2000  # elements: larger arrays are seeded or projected (docstring)
PROJECTIONS = 16
DATASET = "PACS"  # whose defaults hparams_registry gives (overridden below)

# Set for every algorithm: a small MLP featurizer, a learning rate and weight
# decay large enough that three steps move every parameter measurably.
COMMON = {"lr": 1e-2, "weight_decay": 1e-3, "mlp_width": 5, "mlp_depth": 3,
          "mlp_dropout": 0.0}
# DomainBed's defaults changed per algorithm so three calls test more: anneal
# steps at 1 (calls 0, 1, 2 cross the switch and the optimizer reset), and
# values whose default hides a term (SANDMask tau=1 masks every gradient).
OVERRIDES = {
    "ERM": {},
    "IRM": {"irm_penalty_anneal_iters": 1},
    "VREx": {"vrex_penalty_anneal_iters": 1},
    "Fishr": {"penalty_anneal_iters": 1},
    "GroupDRO": {"groupdro_eta": 0.5},
    "Mixup": {},
    "CORAL": {},
    "MMD": {},
    "ANDMask": {},
    "SANDMask": {"tau": 0.5, "k": 1e-2},
    "IGA": {},
    "SD": {},
    "Fish": {},
    "MLDG": {"n_meta_test": 1},
    "RSC": {},
    "MTL": {"mtl_ema": 0.5},
    "DANN": {"lr_g": 1e-2, "lr_d": 2e-2, "weight_decay_g": 1e-3,
             "weight_decay_d": 2e-3, "grad_penalty": 0.1, "lambda": 0.5},
    "CDANN": {"lr_g": 1e-2, "lr_d": 2e-2, "weight_decay_g": 1e-3,
              "weight_decay_d": 2e-3, "grad_penalty": 0.1, "lambda": 0.5},
    "SagNet": {},
    "IB_ERM": {"ib_penalty_anneal_iters": 1},
    # Both anneal steps inside the 3 calls, each with its fresh Adam.
    "IB_IRM": {"irm_penalty_anneal_iters": 1, "ib_penalty_anneal_iters": 2},
    "CausIRL_CORAL": {},
    # CAD with normalized features (CondCAD keeps DomainBed's defaults).
    "CAD": {"is_normalized": True},
    "CondCAD": {},
    # Burn-in for the first call, then two quantile steps with a visible lr.
    "EQRM": {"eqrm_burnin_iters": 1, "eqrm_lr": 1e-3},
    "CausIRL_MMD": {},
    # batch_size is PACS's default for ARM (8): the support size.
    "ARM": {},
}

# What each algorithm's recorded draws are (keys call{k}.draw.<function>).
DRAWS = {
    "Mixup": {
        "randperm": "(1, E): misc.random_pairs_of_minibatches's "
                    "torch.randperm(E); pair i is (perm[i], perm[(i+1) % E])",
        "beta": "(E,): np.random.beta(mixup_alpha, mixup_alpha), lam of pair "
                "i in pair order; x = lam*x_first + (1-lam)*x_second"},
    "MLDG": {
        "randperm": "(1, E): misc.split_meta_train_test's torch.randperm(E); "
                    "meta-train = perm[:E-n_meta_test], meta-test = "
                    "perm[-n_meta_test:], pairs zip(meta_train, "
                    "cycle(meta_test)); n_meta_test=1: (perm[0], perm[2]), "
                    "(perm[1], perm[2])"},
    "SagNet": {
        "rand": "(3, N, 1): alpha = torch.rand(N, 1) of SagNet.randomize, in "
                "call order: forward_c (what='style', content step), "
                "forward_s (what='content', style step), forward_s "
                "(what='content', adversary step); 'content' draws alpha but "
                "does not use it",
        "randperm": "(3, N): idx_swap = torch.randperm(N) of the same three "
                    "randomize calls"},
    **{name: {"randint": "(E,): np.random.randint(0, len(features[e])) for "
                         "each domain e in order: its first randint[e] "
                         "examples go to `first`, the rest to `second`"}
       for name in ("CausIRL_CORAL", "CausIRL_MMD")},
    "MTL": {
        "normal_": "(E, B, W): the N(0, 1) values torch.Tensor.normal_ writes "
                   "over each domain's repeated embedding in MTL.predict "
                   "(domain order): the classifier's second half of inputs "
                   "is this noise, not the embedding"},
}
# Algorithms whose update() moves the torch RNG without a draw that matters.
RNG_USE_WITHOUT_DRAWS = {
    "Fish": "create_clone builds a fresh WholeFish (default init draws) and "
            "then loads the meta network's weights over it",
}
# Environment shims: what is changed around DomainBed's code, and why.
SHIMS = {
    "Fishr": ("BackPACK >= 1.4 gives no grad_batch when backward() is called "
              "with inputs= (github f-dangel/backpack issue 233), and the "
              "BackPACK DomainBed pins (1.3.0) does not import under this "
              "torch. While Fishr.update runs, Tensor.backward drops its "
              "`inputs` argument: _get_grads then also writes .grad of the "
              "featurizer, which the optimizer.zero_grad() (set_to_none) "
              "before the objective's backward clears, so every number is "
              "what DomainBed computes with inputs=."),
}
# DomainBed computations in float32 even under a float64 default dtype.
FLOAT32_NOTES = {
    "ANDMask": "mask_grads: mask.to(torch.float32), so mask_t and "
               "1/(1e-10 + mask_t) are float32 (relative rounding ~6e-8 on "
               "the gradient scale)",
    "CDANN": "class_balance weights: 1/(y_counts[y] * C).float() are float32 "
             "(relative rounding ~6e-8 on each example's discriminator loss)",
}


# ------------------------------------------- arrays too large to be stored


def seed_of(key):
  return zlib.crc32(key.encode())


def seeded_array(spec):
  """The array a sidecar's "seeded" entry describes."""
  rng = np.random.RandomState(spec["seed"])
  if spec["distribution"] == "normal":
    return rng.standard_normal(spec["shape"])
  return rng.uniform(-spec["bound"], spec["bound"], spec["shape"])


def seeded(key, shape, seeded_specs, bound=None):
  """A seeded array for `key`, its spec recorded in `seeded_specs`."""
  spec = {"seed": seed_of(key), "shape": list(shape),
          "distribution": "normal" if bound is None else "uniform"}
  if bound is not None:
    spec["bound"] = bound
  seeded_specs[key] = spec
  return seeded_array(spec)


def projection(name, value):
  """PROJECTIONS seeded random projections of `value` (flattened)."""
  value = np.asarray(value, np.float64).ravel()
  matrix = np.random.RandomState(seed_of("projection." + name)).standard_normal(
      (PROJECTIONS, value.size))
  return matrix @ value


# ------------------------------------------------------------------ imports


def import_domainbed(path):
  """DomainBed's algorithms and hparams_registry from `path`; stand-ins for
  torchvision / timm when they are missing (the MLP does not use them)."""
  stubs = []
  for name in ("torchvision", "timm"):
    try:
      importlib.import_module(name)
    except ImportError:
      module = types.ModuleType(name)
      sys.modules[name] = module
      stubs.append(name)
      if name == "torchvision":
        sys.modules["torchvision.models"] = module.models = types.ModuleType(
            "torchvision.models")
  sys.path.insert(0, os.path.abspath(path))
  algorithms = importlib.import_module("domainbed.algorithms")
  hparams_registry = importlib.import_module("domainbed.hparams_registry")
  if algorithms.backpack is None:
    raise SystemExit("DomainBed's Fishr needs BackPACK: pip install "
                     "backpack-for-pytorch into this venv.")
  return algorithms, hparams_registry, stubs


def domainbed_commit(path, given):
  if given:
    return given
  try:
    return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"],
                          capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown (pass --commit)"


# ---------------------------------------------------------------- recording


class DrawRecorder:
  """Wraps the random functions update() calls and keeps what they drew."""

  def __init__(self):
    self.draws = []  # (function name, np.ndarray) in call order
    self._saved = []

  def __enter__(self):
    recorder = self

    def wrap(owner, attr, name):
      original = getattr(owner, attr)

      def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        value = out.detach().cpu().numpy() if torch.is_tensor(out) else out
        recorder.draws.append((name, np.array(value, copy=True)))
        return out
      self._saved.append((owner, attr, original))
      setattr(owner, attr, wrapped)

    wrap(torch, "randperm", "randperm")
    wrap(torch, "rand", "rand")
    wrap(np.random, "beta", "beta")
    wrap(np.random, "randint", "randint")
    wrap(torch.Tensor, "normal_", "normal_")
    return self

  def __exit__(self, *exc):
    for owner, attr, original in reversed(self._saved):
      setattr(owner, attr, original)
    return False

  def stacked(self):
    """{function: its draws stacked in call order}."""
    out = {}
    for name in dict.fromkeys(n for n, _ in self.draws):
      out[name] = np.stack([v for n, v in self.draws if n == name])
    return out


class BackwardWithoutInputs:
  """Tensor.backward(..., inputs=...) -> Tensor.backward(...) (SHIMS)."""

  def __enter__(self):
    self._original = original = torch.Tensor.backward

    def backward(tensor, *args, **kwargs):
      kwargs.pop("inputs", None)
      return original(tensor, *args, **kwargs)
    torch.Tensor.backward = backward
    return self

  def __exit__(self, *exc):
    torch.Tensor.backward = self._original
    return False


def state_aliases(algorithm):
  """{state_dict name: the earlier name of the same tensor} (ERM's
  network.0.* are its featurizer.*: nn.Sequential shares the modules)."""
  first, aliases = {}, {}
  for key, value in algorithm.state_dict(keep_vars=True).items():
    if id(value) in first:
      aliases[key] = first[id(value)]
    else:
      first[id(value)] = key
  return aliases


def unique_state(algorithm, aliases, keep=None):
  """The state_dict without aliases (only the names in `keep`, if given), as
  numpy arrays."""
  return {k: v.detach().cpu().numpy().copy()
          for k, v in algorithm.state_dict().items()
          if k not in aliases and (keep is None or k in keep)}


def adam_state(optimizer, names_by_param):
  """{param name: {exp_avg, exp_avg_sq, step}} of a torch Adam."""
  out = {}
  for group in optimizer.param_groups:
    for p in group["params"]:
      state = optimizer.state.get(p)
      if not state:
        continue
      name = names_by_param.get(id(p), f"param{len(out)}")
      out[name] = {k: (v.detach().cpu().numpy() if torch.is_tensor(v)
                       else np.asarray(v)) for k, v in state.items()}
  return out


def algorithm_state(name, algorithm):
  """The state beyond the state_dict that the next call reads."""
  out = {}
  if name == "Fishr":
    for d, ma in enumerate(algorithm.ema_per_domain):
      for key, value in ma.ema_data.items():
        out[f"ema_data.d{d}.{key}"] = value.detach().cpu().numpy()
  if name == "Fish":
    # The inner network's weights after the inner loop (meta step's target).
    for key, value in algorithm.network_inner.state_dict().items():
      out[f"network_inner.{key}"] = value.detach().cpu().numpy()
  return out


# ----------------------------------------------------------------- batches


def make_batches(rng, input_shape, seeded_specs):
  """CALLS lists of NUM_DOMAINS (x, y): x ~ N(0, 1) (seeded when large), y
  a shuffled arange(B) % C (every class in every domain: CDANN's one_hot
  needs it)."""
  calls = []
  for call in range(CALLS):
    shape = (NUM_DOMAINS, BATCH) + input_shape
    if np.prod(shape) > LARGE:
      x = seeded(f"call{call}.x", shape, seeded_specs)
    else:
      x = rng.standard_normal(shape)
    y = np.stack([rng.permutation(np.arange(BATCH) % NUM_CLASSES)
                  for _ in range(NUM_DOMAINS)]).astype(np.int64)
    calls.append((x, y))
  return calls


# -------------------------------------------------------------------- runs


def run_one(name, algorithms, hparams_registry):
  torch.set_default_dtype(torch.float64)
  defaults = hparams_registry.default_hparams(name, DATASET)
  erm_keys = set(hparams_registry.default_hparams("ERM", DATASET))
  own = sorted(set(defaults) - erm_keys)
  changes = {**COMMON, **OVERRIDES[name]}
  unknown = sorted(k for k in OVERRIDES[name] if k not in defaults)
  if unknown:
    raise SystemExit(f"{name}: DomainBed has no hparams {unknown}.")
  hparams = {**defaults, **changes}

  torch.manual_seed(SEED)
  input_shape = IMAGE_INPUTS.get(name, INPUT_SHAPE)
  algorithm = algorithms.get_algorithm_class(name)(
      input_shape, NUM_CLASSES, NUM_DOMAINS, hparams)
  algorithm.train()
  arrays, seeded_specs = {}, {}
  aliases = state_aliases(algorithm)
  with torch.no_grad():
    for key, value in algorithm.state_dict().items():
      if key not in aliases and value.is_floating_point() and (
          value.numel() > LARGE):
        bound = 1 / np.sqrt(np.prod(value.shape[1:]))
        value.copy_(torch.tensor(seeded(f"init.{key}", value.shape,
                                        seeded_specs, bound)))
  # Only what exists before the first call (Fish's network_inner appears
  # later: it is saved under call*.state).
  initial = set(algorithm.state_dict())
  for key, value in unique_state(algorithm, aliases, initial).items():
    if f"init.{key}" not in seeded_specs:
      arrays[f"init.{key}"] = value
  param_names = {n for n, _ in algorithm.named_parameters()}

  data_rng = np.random.RandomState(DATA_SEED)
  batches = make_batches(data_rng, input_shape, seeded_specs)
  np.random.seed(DRAW_SEED)
  loss_keys = []
  for call, (x, y) in enumerate(batches):
    if f"call{call}.x" not in seeded_specs:
      arrays[f"call{call}.x"] = x
    arrays[f"call{call}.y"] = y
    minibatches = [(torch.tensor(x[d]), torch.tensor(y[d]))
                   for d in range(NUM_DOMAINS)]
    torch_rng, np_rng = torch.get_rng_state(), np.random.get_state()
    shim = BackwardWithoutInputs() if name in SHIMS else contextlib.nullcontext()
    with DrawRecorder() as recorder, shim:
      losses = algorithm.update(minibatches)
    moved = (not torch.equal(torch_rng, torch.get_rng_state())
             or not all(np.array_equal(a, b) for a, b in
                        zip(np_rng[1:], np.random.get_state()[1:])))
    if moved and not recorder.draws and name not in RNG_USE_WITHOUT_DRAWS:
      raise SystemExit(f"{name}: update() drew random numbers through a "
                       "function this script does not wrap.")
    if recorder.draws and name not in DRAWS:
      raise SystemExit(f"{name}: update() drew {sorted(recorder.stacked())}; "
                       "describe them in DRAWS.")
    for fn, value in recorder.stacked().items():
      arrays[f"call{call}.draw.{fn}"] = value
    loss_keys = sorted(set(loss_keys) | set(losses))
    for key, value in losses.items():
      arrays[f"call{call}.loss.{key}"] = np.float64(value)
    for key, value in unique_state(algorithm, aliases, initial).items():
      kind = "param" if key in param_names else "buffer"
      if value.dtype.kind == "f" and value.size > LARGE:
        arrays[f"call{call}.projection.{key}"] = projection(key, value)
      else:
        arrays[f"call{call}.{kind}.{key}"] = value
    if name == "Fish":  # its inner Adam carries over to the next call
      names_by_param = {id(p): n for n, p in
                        algorithm.network_inner.named_parameters()}
      for pname, state in adam_state(algorithm.optimizer_inner,
                                     names_by_param).items():
        for k, v in state.items():
          arrays[f"call{call}.adam.optimizer_inner.{pname}.{k}"] = v
    for key, value in algorithm_state(name, algorithm).items():
      arrays[f"call{call}.state.{key}"] = value
  algorithm.eval()
  for size in PREDICT_SIZES.get(name, ()):
    x = seeded(f"predict{size}.x", (size,) + input_shape, seeded_specs)
    with torch.no_grad():
      arrays[f"predict{size}.logits"] = algorithm.predict(
          torch.tensor(x)).numpy()
  algorithm.train()
  arrays = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v)
            for k, v in arrays.items()}
  return (arrays, hparams, changes, own, loss_keys,
          sorted(param_names - set(aliases)), aliases, seeded_specs)


def key_meaning(key, name):
  parts = key.split(".")
  if parts[0] == "init":
    return ("the state_dict entry (DomainBed's name after 'init.') before "
            "the first call, torch layout (Linear weight: (out, in))")
  if parts[0].startswith("predict"):
    return ("after the last call, in eval mode, predict() on a batch of N "
            "examples (NCHW; x is seeded, see 'seeded'): the logits")
  call = parts[0]
  kind = parts[1]
  rest = ".".join(parts[2:])
  if kind == "x":
    return (f"{call}'s inputs, (E, B) + input_shape: minibatch d is x[d]; the "
            "batch is the E minibatches in order")
  if kind == "y":
    return f"{call}'s labels (E, B), int64"
  if kind == "param":
    return (f"a parameter (DomainBed's state_dict name in place of *) after "
            f"{call}'s update(), torch layout")
  if kind == "projection":
    return (f"{PROJECTIONS} random projections of a parameter or buffer "
            f"after {call}'s update() (too large to store; module docstring)")
  if kind == "buffer":
    return (f"a buffer (DomainBed's state_dict name in place of *) after "
            f"{call}'s update()")
  if kind == "loss":
    return f"the value {rest!r} of the dict {call}'s update() returned"
  if kind == "adam":
    return (f"Fish's inner torch Adam state after {call} (loaded into the "
            "next call's inner optimizer): optimizer_inner.<param of "
            "network_inner>.exp_avg / exp_avg_sq / step")
  if kind == "state":
    if name == "Fishr":
      return (f"after {call}: MovingAverage.ema_data of domain d "
              "(ema*previous + (1-ema)*variance, NOT divided by 1-ema), "
              "shape (1, numel), param name as the classifier's")
    return f"{parts[2]} (its state_dict names in place of *) after {call}"
  if kind == "draw":
    return f"recorded draws of {call}: {DRAWS[name][parts[2]]}"
  raise ValueError(key)


def key_patterns(arrays, name):
  """{key with the call number and the state_dict name as * : meaning}."""
  patterns = {}
  for key in arrays:
    parts = key.split(".")
    if parts[0].startswith("predict"):
      parts[0] = "predict*"
    if parts[0].startswith("call"):
      parts[0] = "call*"
    if parts[0] == "init" or parts[1] in ("param", "buffer", "projection"):
      parts[1 if parts[0] == "init" else 2:] = ["*"]
    elif parts[1] == "adam":
      parts[3:-1] = ["*"]
    elif parts[1] == "state" and name == "Fishr":
      parts[2:] = ["ema_data", "d*", "*"]
    elif parts[1] == "state":
      parts[2:] = [parts[2], "*"]
    pattern = ".".join(parts)
    if pattern not in patterns:
      patterns[pattern] = key_meaning(key, name).replace(
          key.split(".")[0], "call k" if key.startswith("call") else "init")
  return patterns


def sidecar(name, arrays, hparams, changes, own, loss_keys, params, aliases,
            seeded_specs, commit, stubs, command):
  return {
      "what": (f"DomainBed's own {name}.update() (domainbed/algorithms.py), "
               f"{CALLS} consecutive calls on {CALLS} different minibatch "
               "lists, torch float64 (torch.set_default_dtype)"),
      "domainbed": {"repository": "github facebookresearch/DomainBed",
                    "commit": commit},
      "produced_by": command,
      "versions": {"torch": torch.__version__, "numpy": np.__version__,
                   "python": sys.version.split()[0],
                   "backpack-for-pytorch": _version("backpack-for-pytorch")},
      "stand_in_modules": stubs,
      "setup": {"input_shape": list(IMAGE_INPUTS.get(name, INPUT_SHAPE)), "num_classes": NUM_CLASSES,
                "num_domains": NUM_DOMAINS, "batch_per_domain": BATCH,
                "calls": CALLS, "torch_seed": SEED, "data_seed": DATA_SEED,
                "numpy_draw_seed": DRAW_SEED,
                "hparams_registry_dataset": DATASET},
      "network": (("DomainBed networks.MNIST_CNN featurizer (input "
                   "channels as the algorithm builds it)" if name in
                   IMAGE_INPUTS else
                   "DomainBed networks.MLP featurizer: input Linear(in, w), "
                   "ReLU, (mlp_depth - 2) x [Linear(w, w), ReLU], output "
                   "Linear(w, w) with no final ReLU (mlp_dropout 0)")
                  + "; then the linear classifier. torch default init after "
                  "torch.manual_seed(torch_seed)."),
      "hparams": hparams,
      "changed_from_defaults": changes,
      "algorithm_hparams": own,
      "parameters": params,
      "state_dict_aliases": aliases,
      "loss_keys": loss_keys,
      "draws": DRAWS.get(name, {}),
      "rng_use_without_draws": RNG_USE_WITHOUT_DRAWS.get(name),
      "float32_in_domainbed": FLOAT32_NOTES.get(name),
      "shim": SHIMS.get(name),
      "key_patterns": key_patterns(arrays, name),
      "keys": {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()},
      "seeded": seeded_specs,
      "large_arrays": {
          "elements_above": LARGE, "projections": PROJECTIONS,
          "seeded_rule": "numpy RandomState(seed): standard_normal(shape) "
                         "('normal'), uniform(-bound, bound, shape) "
                         "('uniform')",
          "projection_rule": "RandomState(crc32('projection.' + name))"
                             ".standard_normal((projections, size)) @ "
                             "value.ravel()"},
  }


def _version(dist):
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version(dist)
  except Exception:  # pylint: disable=broad-except
    return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--domainbed", required=True,
                      help="a DomainBed source tree (holding domainbed/)")
  parser.add_argument("--out", required=True)
  parser.add_argument("--algorithms", nargs="*", default=list(OVERRIDES))
  parser.add_argument("--commit", default=None)
  args = parser.parse_args()
  algorithms, hparams_registry, stubs = import_domainbed(args.domainbed)
  commit = domainbed_commit(args.domainbed, args.commit)
  command = shlex.join([sys.executable, *sys.argv])
  os.makedirs(args.out, exist_ok=True)
  for name in args.algorithms:
    arrays, hparams, changes, own, loss_keys, params, aliases, seeded_specs = (
        run_one(name, algorithms, hparams_registry))
    np.savez_compressed(os.path.join(args.out, f"{name}.npz"), **arrays)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
      json.dump(sidecar(name, arrays, hparams, changes, own, loss_keys, params,
                        aliases, seeded_specs, commit, stubs, command), f,
                indent=1)
      f.write("\n")
    print(name, len(arrays), "arrays", "losses:", loss_keys)


if __name__ == "__main__":
  main()
