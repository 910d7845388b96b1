"""The one place each experiment's config becomes an algorithm's typed
`Config` and the shared `base.Schedule`.

- `config_blocks()`: an ml_collections block per registered algorithm, its
  fields and defaults read from the algorithm's `Config`, so every algorithm
  can be chosen and tuned from the command line of every experiment config.
- `from_config_dict(config)`: Colored MNIST (IRM setup): the chosen
  algorithm's block and the schedule fields at the top level of the config.
- `from_domainbed(name, hparams, options)`: DomainBed's sampled hparams,
  through each algorithm's `DomainBedSpec`, plus the options no hparam sets.
"""

import dataclasses
import keyword
import typing
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from fishr_jax import errors
from fishr_jax.algorithms import base
from fishr_jax.algorithms import registry

SCHEDULE_FIELDS = tuple(f.name for f in dataclasses.fields(base.Schedule))


def _field_type(field: dataclasses.Field) -> type:
  """The type of a field (of `int | None`: int), for an unset placeholder."""
  if field.default is not None:
    return type(field.default)
  return next(t for t in typing.get_args(field.type) if t is not type(None))


def config_blocks(overrides: dict[str, dict[str, Any]] | None = None,
                  only_unset: dict[str, tuple[str, ...]] | None = None
                  ) -> dict[str, ml_collections.ConfigDict]:
  """{algorithm: ConfigDict of its Config's fields}, with `overrides`
  replacing defaults. `only_unset[name]` keeps only those fields of that
  algorithm, each None (= keep what the experiment's adapter sets)."""
  overrides = overrides or {}
  blocks = {}
  for name in registry.names():
    fields = dataclasses.fields(registry.get(name).config_class)
    block = ml_collections.ConfigDict()
    for field in fields:
      if only_unset is not None:
        if field.name in only_unset.get(name, ()):
          block[field.name] = placeholder(_field_type(field))
      elif field.default is None:
        block[field.name] = placeholder(_field_type(field))
      else:
        block[field.name] = field.default
    block.update(overrides.get(name, {}))
    blocks[name] = block
  return blocks


def _make_config(name: str, fields: dict[str, Any]) -> Any:
  config_class = registry.get(name).config_class
  known = {f.name for f in dataclasses.fields(config_class)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise errors.ConfigError(f"{name} has no option {unknown}; its options: "
                             f"{sorted(known)}.")
  return config_class(**fields)


def from_config_dict(config: ml_collections.ConfigDict
                     ) -> tuple[Any, base.Schedule]:
  """(algorithm Config, Schedule) of a Colored MNIST config: the block
  config[config.algorithm] and the top-level schedule fields."""
  name = config.algorithm
  registry.get(name)
  block = config.get(name)
  fields = {} if block is None else block.to_dict()
  schedule = base.Schedule(**{k: config[k] for k in SCHEDULE_FIELDS})
  return _make_config(name, fields), schedule


def config_name(hparam: str) -> str:
  """The config.hparams field of DomainBed's hparam `hparam`: a Python
  keyword gets a trailing underscore ("lambda" -> "lambda_"), since a flag
  path is parsed as Python."""
  return hparam + "_" if keyword.iskeyword(hparam) else hparam


def hparam_name(field: str) -> str:
  """DomainBed's name of the config.hparams field `field`."""
  stem = field[:-1] if field.endswith("_") else field
  return stem if keyword.iskeyword(stem) else field


def all_hparam_names() -> list[str]:
  """Every DomainBed hparam any algorithm has, its own or shared."""
  from fishr_jax import hparams as hparams_lib  # pylint: disable=g-import-not-at-top
  return sorted({h for name in registry.names()
                 for h in hparams_lib.specs(name, "PACS")})


def domainbed_options(name: str) -> tuple[str, ...]:
  """The fields of `name`'s Config that no DomainBed hparam sets."""
  from fishr_jax import hparams as hparams_lib  # pylint: disable=g-import-not-at-top
  spec = registry.get(name).domainbed
  # Its own hparams and the shared ones (ARM's support size is the batch size).
  defaults = {k: default for k, (default, _)
              in hparams_lib.specs(name, "ColoredMNIST").items()}
  set_by_hparams = set(spec.to_config(defaults))
  return tuple(f.name for f in dataclasses.fields(registry.get(name).config_class)
               if f.name not in set_by_hparams)


def from_domainbed(name: str, hparams: dict[str, Any],
                   options: ml_collections.ConfigDict | dict | None = None
                   ) -> tuple[Any, base.Schedule]:
  """(algorithm Config, Schedule) for DomainBed hparams. `options` sets the
  fields no hparam sets (e.g. fishr params, grad_path); None values are
  left at the Config's defaults."""
  spec = registry.get(name).domainbed
  options = dict(options or {})
  options = {k: v for k, v in options.items() if v is not None}
  by_hparams = spec.to_config(hparams)
  clash = sorted(set(options) & set(by_hparams))
  if clash:
    raise errors.ConfigError(
        f"{name}: {clash} are set by DomainBed hparams; use "
        "--config.hparams.NAME instead.")
  schedule = base.Schedule(**spec.to_schedule(hparams))
  return _make_config(name, {**by_hparams, **options}), schedule
