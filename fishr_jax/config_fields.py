"""Config fields shared by the experiment configs (configs/*.py), and the
DomainBed fields that only some datasets read.

In the library, not in configs/, so that a config file loaded by path (the
`fishr-jax` console script) imports it without configs/ on sys.path.
"""

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import ml_collections

from fishr_jax import optimizers
from fishr_jax.algorithms import settings

if TYPE_CHECKING:  # the configs need not load the data pipeline
  from fishr_jax.data import domainbed


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


def add_optimizer_field(config: ml_collections.ConfigDict) -> None:
  """The optimizer, an optax call (fishr_jax/optimizers.py), with the run's
  learning rate and coupled weight decay. Default: torch.optim.Adam's
  defaults, as DomainBed and the IRM script use them;
  --config.optimizer='sgd(momentum=0.9)' switches to SGD with momentum."""
  config.optimizer = optimizers.ADAM


def add_diagnostics_fields(config: ml_collections.ConfigDict,
                          examples: int | None = None) -> None:
  """The domains' loss landscapes in the records (fishr_jax/landscape.py):
  every `diagnostics_every` steps (a multiple of the record interval; 0:
  off) and at the last step, the training domains' Hessian diagonals,
  gradient variances and empirical Fisher, and how they differ, as
  "landscape/<part>/..." fields: of the classifier head, and of every layer
  too with diagnostics_layers="all". `examples` (DomainBed): the field
  diagnostics_examples, the fixed examples per training domain they are
  measured on (Colored MNIST measures the whole environments)."""
  config.diagnostics_every = 0
  config.diagnostics_layers = "head"
  if examples is not None:
    config.diagnostics_examples = examples


def add_algorithm_blocks(config: ml_collections.ConfigDict,
                         overrides: dict[str, dict[str, Any]] | None = None,
                         only_unset: dict[str, tuple[str, ...]] | None = None
                         ) -> None:
  """One block per registered algorithm (config.fishr, config.irm, ...)."""
  for name, block in settings.config_blocks(overrides, only_unset).items():
    config[name] = block


# DomainBed's diagnostics_examples default.
DIAGNOSTICS_EXAMPLES = 256


class DatasetField(NamedTuple):
  """A DomainBed config field that only some datasets read."""
  default: Any  # the one value a dataset that does not read it accepts
  read_by: Callable[["domainbed.DatasetSpec"], bool]
  unread_because: str  # why a dataset ignores it: "ignored by PACS, <this>"


# What each dataset reads follows from its spec (data/domainbed.py): a run on
# a dataset that does not read one of these refuses any value but the
# default (config_checks.py); a sweep passes the flag only to the datasets
# that read it.
DATASET_FIELDS = {
    # MNIST's digits: embedded|tfds|idx.
    "digits_source": DatasetField(
        "embedded", lambda spec: spec.reads_digits,
        "which is not made from MNIST digits"),
    # The side the image-folder datasets' images are resized to.
    "image_size": DatasetField(
        224, lambda spec: spec.is_image_folder,
        "which is not read from image folders (only their images are "
        "resized)"),
    # torchvision's ImageNet weights, a local file. The backbones are
    # "mnist_cnn" and "resnet", so a dataset without a ResNet has the CNN.
    "pretrained_checkpoint": DatasetField(
        "", lambda spec: spec.backbone == "resnet",
        "whose MNIST CNN has no pretrained weights (only the ResNet backbone "
        "loads them)"),
}


def add_dataset_fields(config: ml_collections.ConfigDict) -> None:
  """DATASET_FIELDS, at their defaults."""
  for name, field in DATASET_FIELDS.items():
    config[name] = field.default


def absent_field_defaults() -> dict[str, tuple[Any, ...]]:
  """{dotted field: the values it may have now} for the fields a run folder's
  recorded config.json may lack because they were added after it was made
  (workdir.config_changes): such a run ran as the field's default does, so
  a resume may use only that default. Algorithm block fields may also be
  None (DomainBed's blocks: unset = the Config's default); every DomainBed
  hparam override may be None (unset = sampled)."""
  config = ml_collections.ConfigDict()
  add_device_fields(config)
  add_optimizer_field(config)
  add_dataset_fields(config)
  add_diagnostics_fields(config, examples=DIAGNOSTICS_EXAMPLES)
  out: dict[str, tuple[Any, ...]] = {
      key: (value,) for key, value in flatten(config.to_dict()).items()}
  for name, block in settings.config_blocks().items():
    for field, value in block.to_dict().items():
      out[f"{name}.{field}"] = (value, None)
  for name in settings.all_hparam_names():
    out[f"hparams.{settings.config_name(name)}"] = (None,)
  return out


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
  """A nested config dict as {dotted field: value}."""
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: value}
