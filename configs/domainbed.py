"""One DomainBed run (Gulrajani & Lopez-Paz, 2021), the Fishr paper's Table 3.

  python -m fishr_jax.main --config configs/domainbed.py \\
      --config.dataset=ColoredMNIST --config.algorithm=fishr \\
      --config.test_envs=2 --workdir runs/cmnist_fishr_te2

trains on the other environments with the sampled hparams (hparams_seed 0 =
DomainBed's defaults) and writes DomainBed records to DIR/results.jsonl.
Datasets: ColoredMNIST, RotatedMNIST (digits: --config.digits_source
embedded|tfds|idx), VLCS, PACS, OfficeHome, TerraIncognita, DomainNet (from
DomainBed's folders under --config.data_dir; ImageNet weights for ResNet-50
from --config.pretrained_checkpoint, a local torchvision file).
Any hparam can be forced: --config.hparams.lr=1e-4 --config.hparams.lambda=100
(in Python, config.hparams.lambda_: `lambda` is a Python keyword, and the
command line maps any keyword in a flag path to its underscored field).

Fields: docs/configs.md. Protocol and sweeps: docs/domainbed.md, which also
holds the measured runs on the embedded digits with their commands and
commits.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from fishr_jax import config_fields as common
from fishr_jax import hparams as hparams_lib
from fishr_jax.algorithms import registry
from fishr_jax.algorithms import settings


def _hparam_overrides() -> ml_collections.ConfigDict:
  """Every hparam name any algorithm has, unset (None = use the sampled)."""
  overrides = ml_collections.ConfigDict()
  for algorithm in registry.names():
    try:
      specs = hparams_lib.specs(algorithm, "PACS")
    except ValueError:  # no DomainBed hparams
      continue
    for name, (default, _) in specs.items():
      overrides[settings.config_name(name)] = placeholder(type(default))
  return overrides


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.trainer = "domainbed"
  config.dataset = "ColoredMNIST"
  config.algorithm = "fishr"
  config.test_envs = (2,)
  config.steps = 5001
  config.checkpoint_freq = placeholder(int)  # None: the dataset's default
  config.hparams_seed = 0
  config.trial_seed = 0
  config.seed = 0
  config.holdout_fraction = 0.2
  config.data_dir = ""
  # digits_source, image_size, pretrained_checkpoint: read by some datasets.
  common.add_dataset_fields(config)
  # DomainBed's evaluation batch; on XLA:CPU a 256-image batch costs more
  # time per image (docs/speed.md).
  config.eval_batch_size = 64
  common.add_diagnostics_fields(config,
                                examples=common.DIAGNOSTICS_EXAMPLES)
  config.worker_count = 0
  common.add_device_fields(config)
  # The learning rate and weight decay are the sampled hparams (hparams.lr,
  # hparams.weight_decay).
  common.add_optimizer_field(config)
  config.hparams = _hparam_overrides()
  # Each algorithm's options that no DomainBed hparam sets, unset (None: the
  # algorithm's default): --config.fishr.params=all
  # --config.fishr.grad_path=vmap --config.irm.split_halves=False.
  common.add_algorithm_blocks(config, only_unset={
      name: settings.domainbed_options(name) for name in registry.names()})
  config.fishr.moment_sums = "auto"
  return config
