"""The allowed range of every number whose range is part of its meaning: a
learning rate, a penalty weight, a decay, a probability, a count.

One table, `HPARAMS`, holds DomainBed's hparams (shared and each
algorithm's, by DomainBed's names); an algorithm's typed `Config` declares
the range of each numeric field next to its default (`field(default, ...)`)
and its `__post_init__` calls `check_fields`. Both go through `check`, so a
value out of range is refused with one message that names the field, the
value and the range: a negative learning rate or penalty weight would
otherwise train to `done` and put a wrong run into the results.
"""

import dataclasses
import math
from typing import Any

import jax

from fishr_jax import errors


@dataclasses.dataclass(frozen=True)
class Range:
  """low <= x (or < x if low_open) and x <= high (or < high if high_open);
  `integer`: an int (not a bool). Every number must be finite."""
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  integer: bool = False
  optional: bool = False  # None allowed (unset: a default chosen elsewhere)

  def contains(self, value: Any) -> bool:
    if value is None:
      return self.optional
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      # numpy scalars are numbers too
      if not hasattr(value, "dtype") or value.dtype.kind not in "iuf":
        return False
      value = value.item()
    if self.integer and not (isinstance(value, int)
                             or float(value).is_integer()):
      return False
    if not math.isfinite(value):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below

  def describe(self) -> str:
    """'> 0', 'in [0, 1)', 'an integer >= 1', ...: what follows 'must be'."""
    kind = "an integer " if self.integer else ""
    if math.isinf(self.low) and math.isinf(self.high):
      text = f"{kind or 'a '}finite{' number' if not kind else ''}"
    elif math.isinf(self.high):
      text = f"{kind}{'>' if self.low_open else '>='} {_num(self.low)}"
    elif math.isinf(self.low):
      text = f"{kind}{'<' if self.high_open else '<='} {_num(self.high)}"
    else:
      text = (f"{kind}in {'(' if self.low_open else '['}{_num(self.low)}, "
              f"{_num(self.high)}{')' if self.high_open else ']'}")
    return text + (" (or unset)" if self.optional else "")


def _num(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Range(0.0, low_open=True)
NON_NEGATIVE = Range(0.0)
COUNT = Range(0, integer=True)  # steps, iterations: 0 allowed
POSITIVE_COUNT = Range(1, integer=True)
PROBABILITY = Range(0.0, 1.0)
DECAY = Range(0.0, 1.0, high_open=True)  # a moving average's decay, a dropout

# DomainBed's hparams (domainbed/hparams_registry.py names), the shared ones
# and every algorithm's: the random search draws inside these; a forced
# value (--config.hparams.X) must be inside them too.
HPARAMS: dict[str, Range] = {
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "batch_size": POSITIVE_COUNT,
    "resnet_dropout": DECAY,
    "lambda": NON_NEGATIVE,  # Fishr
    "penalty_anneal_iters": COUNT,
    "ema": DECAY,
    "irm_lambda": NON_NEGATIVE,
    "irm_penalty_anneal_iters": COUNT,
    "vrex_lambda": NON_NEGATIVE,
    "vrex_penalty_anneal_iters": COUNT,
    "groupdro_eta": NON_NEGATIVE,
    "mixup_alpha": POSITIVE,  # a Beta(alpha, alpha) parameter
    "mmd_gamma": NON_NEGATIVE,  # MMD's and CORAL's penalty weight
    "sd_reg": NON_NEGATIVE,
    "penalty": NON_NEGATIVE,  # IGA
    "tau": PROBABILITY,  # AND-mask's, SAND-mask's sign agreement
    "k": NON_NEGATIVE,  # SAND-mask
    "meta_lr": NON_NEGATIVE,  # Fish
    "mldg_beta": NON_NEGATIVE,
    "n_meta_test": POSITIVE_COUNT,
    "rsc_f_drop_factor": PROBABILITY,
    "rsc_b_drop_factor": PROBABILITY,
    "lr_d": POSITIVE,  # DANN, CDANN
    "lr_g": POSITIVE,
    "weight_decay_d": NON_NEGATIVE,
    "weight_decay_g": NON_NEGATIVE,
    "beta1": DECAY,
    "d_steps_per_g_step": POSITIVE_COUNT,
    "grad_penalty": NON_NEGATIVE,
    "mlp_width": POSITIVE_COUNT,
    "mlp_depth": Range(2, integer=True),
    "mlp_dropout": DECAY,
    "sag_w_adv": NON_NEGATIVE,
    "mtl_ema": PROBABILITY,
    "ib_lambda": NON_NEGATIVE,
    "ib_penalty_anneal_iters": COUNT,
    "lmbda": NON_NEGATIVE,  # CAD, CondCAD
    "temperature": POSITIVE,
    "eqrm_quantile": Range(0.0, 1.0, low_open=True, high_open=True),
    "eqrm_burnin_iters": NON_NEGATIVE,  # drawn as a float (eqrm.py)
    "eqrm_lr": POSITIVE,
}


def field(default: Any, allowed: Range, why: str = "") -> Any:
  """A dataclass field with its allowed range (checked by check_fields);
  `why` says what the range means, for the message."""
  return dataclasses.field(default=default,
                           metadata={"range": allowed, "why": why})


def check(name: str, value: Any, allowed: Range, why: str = "") -> None:
  """errors.ConfigError naming `name`, its value and the range, unless
  `allowed` contains `value`."""
  if not allowed.contains(value):
    because = f" ({why})" if why else ""
    raise errors.ConfigError(
        f"{name} must be {allowed.describe()}{because}; got {value!r}.")


def check_fields(block: str, instance: Any) -> None:
  """Checks every field of dataclass `instance` that declares a range;
  `block` prefixes the names in the message (e.g. 'fishr')."""
  for f in dataclasses.fields(instance):
    allowed = f.metadata.get("range")
    # A jax array is a per-run value of a vectorized step (vectorized.py),
    # checked when that run's Config was built.
    if allowed is not None and not isinstance(getattr(instance, f.name),
                                              jax.Array):
      check(f"{block}.{f.name}", getattr(instance, f.name), allowed,
            f.metadata.get("why", ""))


def check_hparam(name: str, value: Any, label: str | None = None) -> None:
  """A DomainBed hparam against HPARAMS (a name not there, such as the
  boolean ones, has no range). `label`: the name in the message."""
  allowed = HPARAMS.get(name)
  if allowed is not None:
    check(label or name, value, allowed)
