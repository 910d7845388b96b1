"""ResNet-18/50 and the torchvision importer against torchvision's forward pass.

tests/data/resnet_torchvision.npz holds torchvision's float64 outputs on
weights drawn from a numpy recipe (tests/data/resnet_torchvision.json), so
the state_dicts are regenerated here without torch.
"""

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import errors
from fishr_jax import models
from fishr_jax import resnet
from tests.conftest import DATA_DIR

RTOL = 1e-10
REFERENCE = "resnet_torchvision"


@functools.cache
def _reference() -> dict:
  with open(os.path.join(DATA_DIR, REFERENCE + ".json")) as f:
    spec = json.load(f)
  with np.load(os.path.join(DATA_DIR, REFERENCE + ".npz")) as f:
    return {"spec": spec, **{k: f[k] for k in f.files}}


def _draw(rng: np.random.RandomState, rule: str, shape: tuple) -> np.ndarray:
  if rule in ("conv_weight", "linear_weight"):
    return rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
  if rule == "linear_bias":
    return rng.standard_normal(shape) * 0.01
  if rule in ("bn_weight", "bn_running_var"):
    return rng.uniform(0.5, 1.5, shape)
  if rule in ("bn_bias", "bn_running_mean"):
    return rng.standard_normal(shape) * 0.1
  raise AssertionError(f"unknown rule {rule!r}")


@functools.cache
def _state_dict(depth: int) -> dict[str, np.ndarray]:
  """The reference's torchvision state_dict, from its recipe (no torch)."""
  spec = _reference()["spec"]
  rng = np.random.RandomState(spec["weight_recipe"]["seed"])
  digest = hashlib.sha256()
  state_dict = {}
  for entry in spec["state_dict"][f"resnet{depth}"]:
    if entry["rule"] == "skipped":
      state_dict[entry["key"]] = np.array(0, np.int64)
      continue
    value = _draw(rng, entry["rule"], tuple(entry["shape"]))
    digest.update(value.astype("<f8").tobytes())
    state_dict[entry["key"]] = value
  # A wrong recipe shows here rather than as a forward mismatch.
  assert digest.hexdigest() == spec["weights_sha256"][f"resnet{depth}"]
  return state_dict


def _nhwc(x_nchw: np.ndarray) -> jax.Array:
  return jnp.asarray(x_nchw.transpose(0, 2, 3, 1))


def _relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected|."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _shapes(tree):
  return jax.tree.map(np.shape, tree)


@pytest.mark.parametrize("depth", [18, 50])
def test_forward_matches_torchvision(x64, depth):
  ref = _reference()
  variables = resnet.params_from_torchvision(_state_dict(depth), depth)
  model = resnet.ResNet(depth=depth, num_classes=1000)
  x = _nhwc(ref["x"])
  # The importer fills exactly the tree that the module declares.
  declared = jax.eval_shape(model.init, jax.random.key(0), x)
  assert _shapes(declared) == _shapes(variables)

  features, logits = model.apply(variables, x)
  assert features.dtype == jnp.float64
  errors = {"features": _relative_error(features, ref[f"resnet{depth}.features"]),
            "logits": _relative_error(logits, ref[f"resnet{depth}.logits"])}
  print(f"resnet{depth} max relative error: {errors}")
  assert max(errors.values()) <= RTOL, errors


def test_unsupported_depth():
  with pytest.raises(ValueError, match="depth"):
    resnet.ResNet(depth=34)
  with pytest.raises(ValueError, match="depth"):
    resnet.params_from_torchvision(_state_dict(18), 34)


def test_importer_rejects_missing_and_unexpected_keys():
  state_dict = dict(_state_dict(18))
  del state_dict["layer3.1.bn2.running_var"]
  missing = r"missing keys \['layer3.1.bn2.running_var'\]"
  with pytest.raises(KeyError, match=missing):
    resnet.params_from_torchvision(state_dict, 18)
  state_dict = {**_state_dict(18), "layer5.0.conv1.weight": np.zeros(1)}
  with pytest.raises(KeyError, match="unexpected keys.*layer5.0.conv1.weight"):
    resnet.params_from_torchvision(state_dict, 18)
  # A resnet18 checkpoint does not fit resnet50.
  with pytest.raises(KeyError, match="layer1.0.conv3.weight"):
    resnet.params_from_torchvision(_state_dict(18), 50)


def test_importer_rejects_wrong_shape():
  key = "layer2.0.conv2.weight"
  state_dict = {**_state_dict(18), key: np.zeros((128, 128, 1, 1))}
  with pytest.raises(ValueError, match=rf"'{key}'.*\(128, 128, 3, 3\)"):
    resnet.params_from_torchvision(state_dict, 18)
  state_dict = {**_state_dict(18), "fc.weight": np.zeros((1000, 2048))}
  with pytest.raises(ValueError, match="'fc.weight'"):
    resnet.params_from_torchvision(state_dict, 18)


def test_num_batches_tracked_is_optional():
  state_dict = {k: v for k, v in _state_dict(18).items()
                if not k.endswith("num_batches_tracked")}
  assert _shapes(resnet.params_from_torchvision(state_dict, 18)) == _shapes(
      resnet.params_from_torchvision(_state_dict(18), 18))


@pytest.fixture(scope="module")
def seven_classes():
  """resnet18 with ImageNet-shaped weights and a fresh 7-class head (float32)."""
  model = resnet.ResNet(depth=18, num_classes=7, dropout_rate=0.5)
  pretrained = resnet.params_from_torchvision(_state_dict(18), 18, num_classes=7)
  return model, pretrained, resnet.with_fresh_head(model, pretrained,
                                                   jax.random.key(0))


def test_new_head_is_freshly_initialized(seven_classes):
  model, pretrained, variables = seven_classes
  assert models.HEAD not in pretrained["params"]
  x = jnp.zeros((1, 32, 32, 3))
  declared = jax.eval_shape(model.init, jax.random.key(0), x)
  assert _shapes(declared) == _shapes(variables)
  head = variables["params"][models.HEAD]
  # torch nn.Linear's default init, as DomainBed's fresh head.
  bound = 1 / np.sqrt(512)
  assert 0.9 * bound < np.abs(head["kernel"]).max() <= bound
  assert 0 < np.abs(head["bias"]).max() <= bound
  assert variables["batch_stats"] is pretrained["batch_stats"]
  assert all(variables["params"][k] is v for k, v in pretrained["params"].items())

  # Into a full init (zeros here, to skip drawing the backbone): pretrained
  # leaves replace, the head stays as initialized.
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), declared)
  merged = resnet.merge_pretrained(zeros, pretrained)
  np.testing.assert_array_equal(merged["params"]["layer4_1"]["conv2"]["kernel"],
                                pretrained["params"]["layer4_1"]["conv2"]["kernel"])
  np.testing.assert_array_equal(merged["batch_stats"]["bn1"]["var"],
                                pretrained["batch_stats"]["bn1"]["var"])
  assert not merged["params"][models.HEAD]["kernel"].any()
  # Keeping the 1000-class head does not fit a 7-class model.
  imagenet_head = resnet.params_from_torchvision(_state_dict(18), 18)
  with pytest.raises(ValueError, match="classifier/kernel"):
    resnet.merge_pretrained(zeros, imagenet_head)


def test_a_pretrained_stem_reads_a_fourth_channel_as_domainbed(seven_classes):
  """ARM's 4-channel input: channel i of conv1 is pretrained channel i % 3."""
  model, _, variables = seven_classes
  kernel = variables["params"]["conv1"]["kernel"]
  adapted = resnet.with_input_channels(variables, 4)
  got = adapted["params"]["conv1"]["kernel"]
  np.testing.assert_array_equal(got[:, :, :3], kernel)
  np.testing.assert_array_equal(got[:, :, 3], kernel[:, :, 0])
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  with_zeros = jnp.concatenate([x, jnp.zeros_like(x[..., :1])], -1)
  np.testing.assert_allclose(model.apply(adapted, with_zeros)[1],
                             model.apply(variables, x)[1], rtol=1e-5, atol=1e-6)


def test_dropout_only_when_not_deterministic(seven_classes):
  model, _, variables = seven_classes
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  features, logits = model.apply(variables, x)
  again, _ = model.apply(variables, x, deterministic=True)
  np.testing.assert_array_equal(features, again)

  (dropped, dropped_logits), updates = model.apply(
      variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)},
      mutable=["batch_stats"])
  kept = np.asarray(dropped) != 0
  assert 0 < kept.mean() < 1
  # Inverted dropout: kept features are scaled by 1 / (1 - rate).
  np.testing.assert_allclose(np.asarray(dropped)[kept],
                             2 * np.asarray(features)[kept], rtol=1e-6)
  # The head sees the dropped features.
  np.testing.assert_allclose(
      dropped_logits, model.apply(variables, dropped, method="classify"),
      rtol=1e-6)
  assert not np.allclose(dropped_logits, logits)
  # Frozen BatchNorm: even in training mode the running statistics stay.
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"],
               variables["batch_stats"])

  no_dropout = resnet.ResNet(depth=18, num_classes=7)  # rate 0: no rng needed
  kept_all, _ = no_dropout.apply(variables, x, deterministic=False)
  np.testing.assert_array_equal(kept_all, features)


def test_float32_forward_under_jit(seven_classes):
  model, _, variables = seven_classes
  ref = _reference()
  forward = jax.jit(lambda v, x: model.apply(v, x))
  features, logits = forward(variables, _nhwc(ref["x"]))
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert features.shape == (2, 512) and features.dtype == jnp.float32
  # The backbone does not depend on the head: float32 ~ the float64 reference.
  assert _relative_error(features, ref["resnet18.features"]) < 1e-4


def test_load_checkpoint_npz(tmp_path):
  path = os.path.join(tmp_path, "resnet18.npz")
  np.savez(path, **{k: v.astype(np.float32) for k, v in _state_dict(18).items()})
  loaded = resnet.load_torchvision_checkpoint(path, 18, num_classes=10)
  expected = resnet.params_from_torchvision(_state_dict(18), 18, num_classes=10)
  assert _shapes(loaded) == _shapes(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               loaded, expected)


def test_load_pth_without_torch_says_how_to_convert(tmp_path):
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top
    pytest.skip("torch is installed: .pth files load directly")
  except ImportError:
    pass
  path = os.path.join(tmp_path, "resnet18.pth")
  open(path, "wb").close()
  with pytest.raises(ImportError, match=r"np\.savez"):
    resnet.load_torchvision_checkpoint(path, 18)


def test_a_truncated_npz_checkpoint_is_named(tmp_path):
  path = str(tmp_path / "resnet18.npz")
  np.savez(path, **{k: v.astype(np.float32) for k, v in _state_dict(18).items()})
  with open(path, "r+b") as f:
    f.truncate(1000)
  with pytest.raises(errors.DataError, match=rf"{path}: cannot read the .npz"):
    resnet.load_torchvision_checkpoint(path, 18)
  with pytest.raises(errors.DataError, match="missing, cut short"):
    resnet.load_torchvision_checkpoint(str(tmp_path / "absent.npz"), 18)
