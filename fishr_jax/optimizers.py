"""The optimizer, named in the config as an optax call.

`config.optimizer` is a string such as "adam(b1=0.9, b2=0.999, eps=1e-08)"
(the default of both experiments: torch.optim.Adam's defaults, which
DomainBed and the IRM script use) or "sgd(momentum=0.9)": the name of an
optax optimizer that takes a `learning_rate`, and its other arguments as
Python literals. The learning rate and the weight decay are the run's own
(DomainBed samples them; Colored MNIST's config sets them), so runs of one
vectorized program may differ in them but share the optimizer.

The weight decay is COUPLED, as torch.optim's `weight_decay`: added to the
gradient before the optimizer sees it (optax.add_decayed_weights first),
not decoupled as in AdamW.
"""

import ast
import inspect
from typing import Any

import jax
import optax

from fishr_jax import errors

# torch.optim.Adam's defaults (DomainBed's and the IRM script's optimizer).
ADAM = "adam(b1=0.9, b2=0.999, eps=1e-08)"


def parse(spec: str) -> tuple[str, dict[str, Any]]:
  """"sgd(momentum=0.9)" -> ("sgd", {"momentum": 0.9}); errors.ConfigError
  naming what is wrong otherwise."""
  try:
    call = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise errors.ConfigError(_bad(spec, f"not a call ({e.msg})")) from None
  if isinstance(call, ast.Name):  # "sgd": no arguments
    call = ast.Call(func=call, args=[], keywords=[])
  if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
    raise errors.ConfigError(_bad(spec, "not NAME(ARG=VALUE, ...)"))
  if call.args:
    raise errors.ConfigError(_bad(spec, "give every argument by name"))
  kwargs = {}
  for keyword in call.keywords:
    try:
      kwargs[keyword.arg] = ast.literal_eval(keyword.value)
    except ValueError:
      raise errors.ConfigError(_bad(
          spec, f"{keyword.arg}= must be a Python literal")) from None
  name = call.func.id
  factory = getattr(optax, name, None)
  parameters = (inspect.signature(factory).parameters
                if callable(factory) else {})
  if "learning_rate" not in parameters:
    raise errors.ConfigError(_bad(
        spec, f"optax has no optimizer {name!r} that takes a learning_rate "
        "(e.g. adam, adamw, sgd, rmsprop, lamb, lion)"))
  unknown = sorted(set(kwargs) - set(parameters) | {"learning_rate"} & set(kwargs))
  if unknown:
    raise errors.ConfigError(_bad(
        spec, f"optax.{name} takes no {', '.join(unknown)} here (its "
        f"arguments: {', '.join(p for p in parameters if p != 'learning_rate')}"
        "; the learning rate is the run's lr)"))
  return name, kwargs


def make(spec: str, lr: float | jax.Array, weight_decay: float | jax.Array = 0.0
         ) -> optax.GradientTransformation:
  """The optimizer `spec` names, at learning rate `lr`, with coupled weight
  decay `weight_decay` (either may be traced: a vectorized run's own)."""
  name, kwargs = parse(spec)
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     getattr(optax, name)(learning_rate=lr, **kwargs))


def torch_adam(lr: float | jax.Array, weight_decay: float | jax.Array = 0.0,
               b1: float | jax.Array = 0.9, b2: float | jax.Array = 0.999
               ) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, betas=(b1, b2), eps=1e-8, weight_decay): the
  optimizers an algorithm fixes itself (DANN's two Adams)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.adam(learning_rate=lr, b1=b1, b2=b2, eps=1e-8))


def _bad(spec: str, why: str) -> str:
  return (f"config.optimizer={spec!r}: {why}. Write an optax call, e.g. "
          f"{ADAM!r} or 'sgd(momentum=0.9)'.")
