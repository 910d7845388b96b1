"""DomainBed's ResNet-18 / ResNet-50 featurizers in Flax, with a linear head.

The backbone is torchvision's ResNet (v1.5: a Bottleneck strides on its 3x3
conv) on NHWC inputs, with torchvision's symmetric explicit padding: Flax's
'SAME' pads (2, 3) / (0, 1) at stride 2 on even sizes and gives different
numbers. As in DomainBed, BatchNorm is frozen: it always normalizes with the
running statistics (collection `batch_stats`, never updated), while its scale
and bias stay trainable parameters. Dropout (DomainBed's `resnet_dropout`)
acts on the pooled features, so the head and Fishr's closed form see the
dropped features.

Pretrained weights come from a torchvision state_dict that the user downloaded
(nothing is fetched here). Typical DomainBed use, ImageNet weights with a new
head:

  model = ResNet(depth=50, num_classes=7, dropout_rate=0.1)
  pretrained = load_torchvision_checkpoint("resnet50.npz", 50, num_classes=7)
  variables = with_fresh_head(model, pretrained, rng)
  features, logits = model.apply(variables, x, deterministic=False,
                                 rngs={"dropout": dropout_rng})

Inputs are expected normalized as torchvision's weights were trained
(ImageNet mean / std), which DomainBed does in its data transforms.
"""

import dataclasses
import os
import zipfile
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fishr_jax import errors
from fishr_jax import models

# Blocks per stage.
STAGE_SIZES = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}
_STAGE_WIDTHS = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)
_STEM_WIDTH = 64
_BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default

Variables = dict[str, Any]


def _check_depth(depth: int) -> None:
  if depth not in STAGE_SIZES:
    raise ValueError(f"ResNet depth must be one of {sorted(STAGE_SIZES)}, "
                     f"got {depth!r}.")


def _expansion(depth: int) -> int:
  """A block's output channels over its width: 1 (Basic), 4 (Bottleneck)."""
  return 1 if depth == 18 else 4


def num_features(depth: int) -> int:
  """Dimension of the pooled features (the head's input): 512 or 2048."""
  _check_depth(depth)
  return _STAGE_WIDTHS[-1] * _expansion(depth)


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
  name: str        # Flax name, e.g. "layer2_0"
  torch_name: str  # torchvision name, e.g. "layer2.0"
  in_channels: int
  width: int
  strides: int
  downsample: bool


def _block_specs(depth: int) -> Iterator[_BlockSpec]:
  """Every residual block, in torchvision's order and with its arithmetic.

  Shared by the module and the importer so both agree on which blocks have a
  downsample branch (torchvision: stride != 1 or channels change).
  """
  expansion = _expansion(depth)
  in_channels = _STEM_WIDTH
  for stage, (size, width, stage_strides) in enumerate(
      zip(STAGE_SIZES[depth], _STAGE_WIDTHS, _STAGE_STRIDES), start=1):
    for index in range(size):
      strides = stage_strides if index == 0 else 1
      downsample = strides != 1 or in_channels != width * expansion
      yield _BlockSpec(f"layer{stage}_{index}", f"layer{stage}.{index}",
                       in_channels, width, strides, downsample)
      in_channels = width * expansion


def _conv(features: int, kernel_size: int, strides: int, name: str,
          dtype: Any = None) -> nn.Conv:
  # torchvision's init: kaiming_normal_(mode="fan_out", nonlinearity="relu"),
  # an untruncated normal.
  pad = (kernel_size - 1) // 2
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=nn.initializers.variance_scaling(
                     2.0, "fan_out", "normal"),
                 dtype=dtype, name=name)


def _frozen_batch_norm(name: str, dtype: Any = None) -> nn.BatchNorm:
  # Flax's initial scale 1, bias 0, mean 0, var 1 are torch BatchNorm2d's.
  return nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON,
                      dtype=dtype, name=name)


class _ResidualBlock(nn.Module):
  """BasicBlock (two 3x3 convs) or Bottleneck (1x1, strided 3x3, 1x1)."""
  width: int
  strides: int
  downsample: bool
  bottleneck: bool
  dtype: Any = None  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.bottleneck:
      convs = ((self.width, 1, 1), (self.width, 3, self.strides),
               (self.width * 4, 1, 1))
    else:
      convs = ((self.width, 3, self.strides), (self.width, 3, 1))
    y = x
    for i, (features, kernel_size, strides) in enumerate(convs, start=1):
      y = _conv(features, kernel_size, strides, f"conv{i}", self.dtype)(y)
      y = _frozen_batch_norm(f"bn{i}", self.dtype)(y)
      if i < len(convs):
        y = models.relu(y)
    identity = x
    if self.downsample:
      identity = _conv(convs[-1][0], 1, self.strides, "downsample_conv",
                       self.dtype)(x)
      identity = _frozen_batch_norm("downsample_bn", self.dtype)(identity)
    return models.relu(y + identity)


class ResNet(nn.Module):
  """torchvision ResNet-18/50 featurizer, frozen BatchNorm, dropout, linear head.

  Parameter names follow torchvision's with "." -> "_" inside a block name
  (`layer2_0/conv1`, `layer2_0/downsample_conv`, ...); the head is `classifier`.
  """
  depth: int = 50
  num_classes: int = 1000
  dropout_rate: float = 0.0
  dtype: Any = None  # compute dtype (None: float32); parameters stay float32

  def __post_init__(self):
    _check_depth(self.depth)  # fail at construction, not at the first init
    super().__post_init__()

  @property
  def num_features(self) -> int:
    return num_features(self.depth)

  def setup(self):
    self.conv1 = _conv(_STEM_WIDTH, 7, 2, "conv1", self.dtype)
    self.bn1 = _frozen_batch_norm("bn1", self.dtype)
    self.blocks = [
        _ResidualBlock(spec.width, spec.strides, spec.downsample,
                       bottleneck=self.depth != 18, dtype=self.dtype,
                       name=spec.name)
        for spec in _block_specs(self.depth)]
    self.dropout = models.Dropout(self.dropout_rate)
    # DomainBed's head is a fresh torch nn.Linear (and torchvision's fc, from
    # random weights, one too): U(+-1/sqrt(fan_in)) for kernel and bias.
    self.classifier = models.torch_dense(self.num_classes, self.num_features,
                                         models.HEAD, self.dtype)

  def featurize(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """NHWC images -> (N, num_features) pooled features, after dropout."""
    x = models.relu(self.bn1(self.conv1(x)))
    # Padded cells hold -inf, so they never win the max (as torch's pad).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x)
    features = jnp.mean(x, axis=(1, 2))
    return self.dropout(features, deterministic=deterministic)

  def classify(self, features: jax.Array) -> jax.Array:
    return self.classifier(features)

  def __call__(self, x: jax.Array, deterministic: bool = True
               ) -> tuple[jax.Array, jax.Array]:
    features = self.featurize(x, deterministic)
    return features, self.classify(features)


# --- torchvision weights -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
  torch_key: str
  torch_shape: tuple[int, ...]
  collection: str              # "params" or "batch_stats"
  path: tuple[str, ...]        # inside the collection
  is_conv: bool


def _backbone_entries(depth: int) -> list[_Entry]:
  """Every torchvision backbone tensor (all but fc) and where it goes in Flax."""
  entries = []

  def conv(torch_name, path, out_channels, in_channels, kernel_size):
    entries.append(_Entry(f"{torch_name}.weight",
                          (out_channels, in_channels, kernel_size, kernel_size),
                          "params", path + ("kernel",), True))

  def batch_norm(torch_name, path, channels):
    for torch_suffix, collection, name in (
        ("weight", "params", "scale"), ("bias", "params", "bias"),
        ("running_mean", "batch_stats", "mean"),
        ("running_var", "batch_stats", "var")):
      entries.append(_Entry(f"{torch_name}.{torch_suffix}", (channels,),
                            collection, path + (name,), False))

  conv("conv1", ("conv1",), _STEM_WIDTH, 3, 7)
  batch_norm("bn1", ("bn1",), _STEM_WIDTH)
  expansion = _expansion(depth)
  for spec in _block_specs(depth):
    if expansion == 1:
      convs = ((spec.width, spec.in_channels, 3), (spec.width, spec.width, 3))
    else:
      convs = ((spec.width, spec.in_channels, 1), (spec.width, spec.width, 3),
               (spec.width * expansion, spec.width, 1))
    for i, (out_channels, in_channels, kernel_size) in enumerate(convs, start=1):
      conv(f"{spec.torch_name}.conv{i}", (spec.name, f"conv{i}"),
           out_channels, in_channels, kernel_size)
      batch_norm(f"{spec.torch_name}.bn{i}", (spec.name, f"bn{i}"), out_channels)
    if spec.downsample:
      out_channels = spec.width * expansion
      conv(f"{spec.torch_name}.downsample.0", (spec.name, "downsample_conv"),
           out_channels, spec.in_channels, 1)
      batch_norm(f"{spec.torch_name}.downsample.1", (spec.name, "downsample_bn"),
                 out_channels)
  return entries


def _checked(state_dict: Mapping[str, Any], key: str,
             expected: tuple[int | None, ...]) -> np.ndarray:
  """state_dict[key] as an array; None in `expected` matches any size."""
  value = np.asarray(state_dict[key])
  if value.ndim != len(expected) or any(
      e is not None and e != s for e, s in zip(expected, value.shape)):
    shown = tuple("*" if e is None else e for e in expected)
    raise ValueError(f"torchvision state_dict entry {key!r}: expected shape "
                     f"{shown} (torch layout), got {value.shape}.")
  return value


def params_from_torchvision(state_dict: Mapping[str, Any], depth: int,
                            num_classes: int | None = None) -> Variables:
  """A torchvision resnet{18,50} state_dict -> {"params", "batch_stats"}.

  Conv weights (out, in, kh, kw) become kernels (kh, kw, in, out), fc.weight
  is transposed into `classifier/kernel`, BatchNorm weight/bias become
  scale/bias and running_mean/var the `batch_stats` mean/var;
  num_batches_tracked is ignored. Values may be numpy arrays or CPU tensors.

  `num_classes=None` or equal to the checkpoint's fc rows keeps the head. Any
  other value drops it: the returned tree has no `classifier`, for a fresh
  one from `with_fresh_head` (or `merge_pretrained` into a full init).

  Strict: a missing or unexpected key, or a shape that does not fit this
  depth, raises (KeyError / ValueError naming the key).
  """
  _check_depth(depth)
  entries = _backbone_entries(depth)
  required = [e.torch_key for e in entries] + ["fc.weight", "fc.bias"]
  # torch keeps a step counter per BatchNorm; it plays no part in eval mode.
  counters = {e.torch_key.rsplit(".", 1)[0] + ".num_batches_tracked"
              for e in entries if e.path[-1] == "mean"}
  missing = [k for k in required if k not in state_dict]
  unexpected = sorted(set(state_dict) - set(required) - counters)
  if missing or unexpected:
    raise KeyError(f"torchvision resnet{depth} state_dict does not fit: "
                   f"missing keys {missing}, unexpected keys {unexpected}.")

  flat = {}
  for entry in entries:
    value = _checked(state_dict, entry.torch_key, entry.torch_shape)
    if entry.is_conv:
      value = value.transpose(2, 3, 1, 0)
    flat[(entry.collection,) + entry.path] = jnp.asarray(value)

  fc_weight = _checked(state_dict, "fc.weight", (None, num_features(depth)))
  checkpoint_classes = fc_weight.shape[0]
  fc_bias = _checked(state_dict, "fc.bias", (checkpoint_classes,))
  if num_classes is None or num_classes == checkpoint_classes:
    flat[("params", models.HEAD, "kernel")] = jnp.asarray(fc_weight.T)
    flat[("params", models.HEAD, "bias")] = jnp.asarray(fc_bias)
  return traverse_util.unflatten_dict(flat)


def with_fresh_head(model: ResNet, pretrained: Variables,
                    rng: jax.Array) -> Variables:
  """`pretrained` with `model`'s head freshly initialized (replacing any head).

  Only the head is initialized, which spares drawing the whole backbone that
  `model.init` would and the pretrained weights would then overwrite.
  """
  features = jnp.zeros((1, model.num_features), jnp.float32)
  head = model.init(rng, features, method="classify")["params"][models.HEAD]
  return {**pretrained, "params": {**pretrained["params"], models.HEAD: head}}


def with_input_channels(variables: Variables, channels: int) -> Variables:
  """Pretrained `variables` for inputs of `channels` channels, as DomainBed's
  ResNet adapts torchvision's stem: conv1's input channel i is the
  pretrained one i % 3 (ARM's 4-channel input)."""
  kernel = variables["params"]["conv1"]["kernel"]  # (7, 7, 3, 64)
  kernel = kernel[:, :, [i % kernel.shape[2] for i in range(channels)]]
  params = {**variables["params"], "conv1": {**variables["params"]["conv1"],
                                             "kernel": kernel}}
  return {**variables, "params": params}


def merge_pretrained(variables: Variables, pretrained: Variables) -> Variables:
  """`variables` (e.g. a fresh `model.init`) with every leaf of `pretrained`.

  What `pretrained` lacks (the head, after a change of classes) keeps its
  fresh value. A pretrained leaf with no counterpart, or of another shape,
  raises: it means the model does not match the checkpoint.
  """
  flat = traverse_util.flatten_dict(variables)
  for path, value in traverse_util.flatten_dict(pretrained).items():
    name = "/".join(path)
    if path not in flat:
      raise KeyError(f"pretrained variable {name!r} has no counterpart in the "
                     "model's variables.")
    if np.shape(flat[path]) != np.shape(value):
      raise ValueError(f"pretrained variable {name!r} has shape "
                       f"{np.shape(value)}, the model's has "
                       f"{np.shape(flat[path])}.")
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


_PTH_TO_NPZ = (
    "python -c \"import sys, numpy as np, torch; "
    "sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True); "
    "np.savez(sys.argv[2], **{k: v.numpy() for k, v in sd.items()})\" "
    "resnet50.pth resnet50.npz")


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
      raise errors.DataError(
          f"{path}: cannot read the .npz ({type(e).__name__}: {e}); it is "
          "missing, cut short or not an .npz. Convert it again:\n  "
          + _PTH_TO_NPZ) from e
  if suffix in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          f"Reading {path!r} needs PyTorch, which is not installed. Convert "
          "it to .npz once where torch is available, then load the .npz:\n  "
          + _PTH_TO_NPZ) from e
    # weights_only: a plain state_dict needs no arbitrary unpickling.
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
      raise ValueError(f"{path!r} holds a {type(state_dict).__name__}, not a "
                       "state_dict.")
    return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
  raise ValueError(f"Unknown checkpoint format {suffix!r} for {path!r}: "
                   "expected .npz, or .pth / .pt with torch installed.")


def load_torchvision_checkpoint(path: str, depth: int,
                                num_classes: int | None = None) -> Variables:
  """`params_from_torchvision` on a local file: .npz, or .pth / .pt via torch."""
  _check_depth(depth)
  return params_from_torchvision(_read_state_dict(path), depth, num_classes)
