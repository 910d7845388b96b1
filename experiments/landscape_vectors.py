"""Checks fishr_jax.landscape against a file of BackPACK's numbers.

    python -m experiments.landscape_vectors tests/data/landscape_backpack.npz

The file (format of tests/data/landscape_backpack.json; any sizes) holds a
ReLU MLP's float64 weights in torch's layout (`param.<layer>.weight` (out,
in), `param.<layer>.bias`; the layers in file order, ReLU between them, the
last one the classifier), two or more domains (`env<k>.x`, `env<k>.y`), and
what BackPACK computed: per domain the mean Hessian diagonal and the
gradient variance of the head (`hess.head.env<k>.*`, `var.head.env<k>.*`)
and of the whole network (`hess.full...` over the first `num_hessian`
examples, `var.full...`), and the between-domain scalars (`head.*`,
`full.*`). Prints the largest relative error of each quantity (max |ours -
theirs| / max |theirs|) and exits 1 if one is above --tolerance.
"""

import argparse
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fishr_jax import landscape

TOLERANCE = 1e-8
# The file's between-domain scalars -> landscape.compare's names.
SCALARS = {"distance": "distance", "to_mean": "to_mean", "cosine": "cosine",
           "norm_gap": "norm_gap", "meannorm": "meannorm"}


def layer_names(reference: dict[str, np.ndarray]) -> list[str]:
  """The MLP's layers, in file order; the last is the classifier."""
  names = []
  for key in reference:
    match = re.fullmatch(r"param\.(.+)\.weight", key)
    if match:
      names.append(match.group(1))
  return names


def mlp_params(reference: dict[str, np.ndarray]) -> dict[str, dict]:
  """torch (out, in) weights -> flax {"kernel": (in, out), "bias"}."""
  return {name: {"kernel": jnp.asarray(reference[f"param.{name}.weight"].T),
                 "bias": jnp.asarray(reference[f"param.{name}.bias"])}
          for name in layer_names(reference)}


def mlp_features(params: dict[str, dict], x: jax.Array, head: str
                 ) -> jax.Array:
  for name, layer in params.items():
    if name != head:
      x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
  return x


def mlp_logits(params: dict[str, dict], x: jax.Array, head: str) -> jax.Array:
  features = mlp_features(params, x, head)
  return features @ params[head]["kernel"] + params[head]["bias"]


def domains(reference: dict[str, np.ndarray]) -> list[str]:
  return sorted({key.split(".")[0] for key in reference
                 if re.fullmatch(r"env\d+\.x", key)},
                key=lambda name: int(name[3:]))


def ours(reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """fishr_jax.landscape's values of every quantity the file holds, under
  the file's keys."""
  params = mlp_params(reference)
  head = layer_names(reference)[-1]
  envs = domains(reference)
  x = jnp.concatenate([jnp.asarray(reference[f"{e}.x"]) for e in envs])
  y = jnp.concatenate([jnp.asarray(reference[f"{e}.y"]) for e in envs])
  sizes = [len(reference[f"{e}.y"]) for e in envs]
  domain_ids = jnp.repeat(jnp.arange(len(envs)), np.array(sizes))
  num_hessian = int(reference["num_hessian"])
  first = np.concatenate([np.arange(n) < num_hessian for n in sizes])

  @jax.jit
  def compute(params, x, y, domain_ids, first):
    features = mlp_features(params, x, head)
    head_values = landscape.head_curvature(
        features, features @ params[head]["kernel"] + params[head]["bias"],
        y, domain_ids, len(envs))
    full_values = landscape.network_curvature(
        lambda p, x_i: mlp_logits(p, x_i[None], head)[0], params, x, y,
        domain_ids, len(envs), hessian_examples=first)
    return head_values, full_values

  head_values, full_values = compute(params, x, y, domain_ids,
                                     jnp.asarray(first))

  out = {}
  for part, values, layers in (
      ("head", head_values, {head: (head_values.hessian,
                                    head_values.variance)}),
      ("full", full_values, {name: (full_values.hessian[name],
                                    full_values.variance[name])
                             for name in params})):
    for name, (hessian, variance) in layers.items():
      for k, e in enumerate(envs):
        for torch_name, flax_name in (("weight", "kernel"), ("bias", "bias")):
          transpose = (lambda a: a.T) if torch_name == "weight" else (
              lambda a: a)
          out[f"hess.{part}.{e}.{name}.{torch_name}"] = transpose(
              np.asarray(hessian[flax_name][k]))
          out[f"var.{part}.{e}.{name}.{torch_name}"] = transpose(
              np.asarray(variance[flax_name][k]))
    for prefix, quantity in (("fishr", values.variance),
                             ("hessian", values.hessian)):
      compared = landscape.compare(quantity)
      for file_name, our_name in SCALARS.items():
        out[f"{part}.{prefix}_{file_name}"] = np.asarray(compared[our_name])
  return out


def relative_errors(reference: dict[str, np.ndarray]
                    ) -> dict[str, float]:
  """{key: max |ours - theirs| / max |theirs|} for each key both have."""
  computed = ours(reference)
  unchecked = sorted(
      key for key in reference
      if re.match(r"(hess|var)\.|(head|full)\.", key) and key not in computed)
  if unchecked:
    raise ValueError(f"No value to compare with {', '.join(unchecked)}: not "
                     "of this file format.")
  errors = {}
  for key, value in computed.items():
    if key not in reference:
      continue
    theirs = np.asarray(reference[key], np.float64)
    scale = np.max(np.abs(theirs))
    diff = np.max(np.abs(np.asarray(value, np.float64) - theirs))
    errors[key] = float(diff / scale) if scale > 0 else float(diff)
  return errors


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("file", help="an .npz of BackPACK's values")
  parser.add_argument("--tolerance", type=float, default=TOLERANCE)
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_x64", True)
  with np.load(args.file) as data:
    reference = dict(data)
  try:
    errors = relative_errors(reference)
  except (KeyError, ValueError) as e:
    print(f"error: {args.file}: {e}", file=sys.stderr)
    return 1
  if not errors:
    print(f"error: {args.file} holds none of the quantities this checks.",
          file=sys.stderr)
    return 1
  width = max(map(len, errors))
  for key, error in errors.items():
    flag = "" if error <= args.tolerance else "  > tolerance"
    print(f"{key:<{width}}  {error:.2e}{flag}")
  worst = max(errors.values())
  print(f"largest relative error {worst:.2e} over {len(errors)} quantities "
        f"(tolerance {args.tolerance:g})")
  return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
  sys.exit(main())
