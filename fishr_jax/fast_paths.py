"""Faster forms of the reference math, each opt-in and proven equal to it.

`penalties.dense_grad_variance` is the method as written: one-hot routed
einsums, any batch layout. The forms here compute the same numbers
(tests/test_fast_paths.py: every variant, jitted, on 1/2/4/8 devices) with
less work on some backend. Which one a run uses is a config field
(`fishr.moment_sums`), resolved once when the algorithm is built by
`dense_grad_variance_fn`; nothing here reads ambient state (the number of
devices the batch is split over is an argument).

  "reference"      penalties.dense_grad_variance.
  "domain_blocks"  the batch is laid out as the loaders give it: on each of
                   `num_shards` device slices, E equal blocks of examples in
                   domain order. Each domain's sums then skip the other
                   domains' rows (the reference's routed columns cost E times
                   the work). The layout is checked where the batch is made
                   (parallel.shard_batch), not inside the step.
  "chunked"        the reference's routed sums through `feature_moment_sums`,
                   a hand-written VJP that squares the features in
                   cache-sized row chunks and, for a few columns, fuses the
                   features' cotangent into one elementwise expression: on
                   XLA:CPU each (N, D) temporary is a fresh allocation.
  "auto"           "chunked" for layers with few routed columns on CPU,
                   "domain_blocks" otherwise.

Also XLA:CPU's YNNPACK dot fusion, a compile option of the train step
(`cpu_compiler_options`).
"""

import functools
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fishr_jax import errors
from fishr_jax import losses
from fishr_jax import penalties

MOMENT_SUMS = ("auto", "reference", "domain_blocks", "chunked")

# (inputs, signals, domain_ids, num_domains, centered) -> {"kernel", "bias"}
DenseGradVariance = Callable[..., dict[str, jax.Array]]

_EXACT = jax.lax.Precision.HIGHEST
# Rows of the squared features taken at once (8192 x 390 floats: 12 MiB).
_ROW_CHUNK = 8192
# Up to this many routed columns (E * K) the features' cotangent is one
# elementwise expression; beyond it two matmuls are cheaper.
_ELEMENTWISE_MAX_COLUMNS = 8


def needs_domain_blocks(moment_sums: str) -> bool:
  """Whether the batch must come in the loaders' domain-block layout."""
  return moment_sums in ("auto", "domain_blocks")


def dense_grad_variance_fn(moment_sums: str, platform: str,
                           num_shards: int = 1) -> DenseGradVariance:
  """The Dense-layer variance function `moment_sums` names, for a step that
  runs on `platform` ("cpu", "gpu", "tpu") over `num_shards` data shards."""
  if moment_sums not in MOMENT_SUMS:
    raise errors.ConfigError(
        f"fishr.moment_sums must be one of {MOMENT_SUMS}, got "
        f"{moment_sums!r}.")
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
  if moment_sums == "reference":
    return penalties.dense_grad_variance
  if moment_sums == "chunked":
    return chunked_dense_grad_variance
  blocks = functools.partial(blocked_dense_grad_variance, num_shards=num_shards)
  if moment_sums == "domain_blocks" or platform != "cpu":
    return blocks

  def auto(inputs, signals, domain_ids, num_domains, centered=True):
    if num_domains * signals.shape[1] <= _ELEMENTWISE_MAX_COLUMNS:
      return chunked_dense_grad_variance(inputs, signals, domain_ids,
                                         num_domains, centered)
    return blocks(inputs, signals, domain_ids, num_domains, centered)

  return auto


def _variances(sums, sq_sums, bias_sums, bias_sq_sums, counts, centered):
  """Per-domain moments from sums laid out (E, K, D) and (E, K), in flax
  Dense's layout {"kernel": (E, D, K), "bias": (E, K)}."""
  per_domain = lambda x: x / counts.reshape((-1,) + (1,) * (x.ndim - 1))
  kernel_sq = jnp.swapaxes(per_domain(sq_sums), 1, 2)
  bias_sq = per_domain(bias_sq_sums)
  if not centered:
    return {"kernel": kernel_sq, "bias": bias_sq}
  kernel_mean = jnp.swapaxes(per_domain(sums), 1, 2)
  bias_mean = per_domain(bias_sums)
  return {"kernel": kernel_sq - kernel_mean**2, "bias": bias_sq - bias_mean**2}


def blocked_dense_grad_variance(inputs: jax.Array, signals: jax.Array,
                                domain_ids: jax.Array, num_domains: int,
                                centered: bool = True, *,
                                num_shards: int = 1) -> dict[str, jax.Array]:
  """penalties.dense_grad_variance for a batch whose `num_shards` equal
  slices each hold E equal blocks of examples in domain order
  (parallel.check_domain_blocks); `domain_ids` is not read. Each device sums
  its own blocks, then the shards are added (an all-reduce)."""
  del domain_ids  # the layout says it
  a = losses.at_least_float32(inputs)
  d = losses.at_least_float32(signals)
  num_examples = a.shape[0]
  if num_examples % (num_domains * num_shards):
    raise ValueError(f"{num_examples} examples cannot form {num_domains} "
                     f"equal domain blocks on each of {num_shards} shards.")
  # (E, B, ...) blocks; sharded, (shards, E, B, ...): each device sums its
  # own blocks, then the shards are added (an all-reduce). The batch axes
  # stay leading so no (N, D) operand is transposed.
  lead = (num_domains,) if num_shards == 1 else (num_shards, num_domains)
  blocks = lambda x: x.reshape(lead + (-1,) + x.shape[1:])
  over_shards = lambda x: x if num_shards == 1 else x.sum(axis=0)
  a, d = blocks(a), blocks(d)
  sums = over_shards(jnp.einsum("...bk,...bd->...kd", d, a, precision=_EXACT))
  sq_sums = over_shards(jnp.einsum("...bk,...bd->...kd", d * d, a * a,
                                   precision=_EXACT))
  bias_sums = over_shards(d.sum(axis=-2))
  bias_sq_sums = over_shards((d * d).sum(axis=-2))
  counts = jnp.full((num_domains,), num_examples // num_domains, a.dtype)
  return _variances(sums, sq_sums, bias_sums, bias_sq_sums, counts, centered)


def chunked_dense_grad_variance(inputs: jax.Array, signals: jax.Array,
                                domain_ids: jax.Array, num_domains: int,
                                centered: bool = True) -> dict[str, jax.Array]:
  """penalties.dense_grad_variance with its routed sums through
  `feature_moment_sums` (any batch layout)."""
  a = losses.at_least_float32(inputs)
  d = losses.at_least_float32(signals)
  one_hot = jax.nn.one_hot(domain_ids, num_domains, dtype=a.dtype)
  counts = one_hot.sum(axis=0)
  num_columns = d.shape[1]
  # Each example's signal in its domain's block of columns: (N, E * K).
  routed = (one_hot[:, :, None] * d[:, None, :]).reshape(-1, num_domains *
                                                         num_columns)
  routed_sq = routed * jnp.tile(d, (1, num_domains))
  sums, sq_sums = feature_moment_sums(a, routed, routed_sq)
  by_domain = lambda x: x.reshape((num_domains, num_columns) + x.shape[1:])
  return _variances(by_domain(sums), by_domain(sq_sums),
                    by_domain(routed.sum(axis=0)),
                    by_domain(routed_sq.sum(axis=0)), counts, centered)


def _row_chunks(num_rows: int) -> list[tuple[int, int]]:
  return [(start, min(start + _ROW_CHUNK, num_rows))
          for start in range(0, num_rows, _ROW_CHUNK)]


def _chunked_square_sums(features, weights):
  """weights^T @ features**2 without materialising features**2."""
  return sum(jnp.einsum("nk,nd->kd", weights[a:b], features[a:b]**2,
                        precision=_EXACT)
             for a, b in _row_chunks(features.shape[0]))


@jax.custom_vjp
def feature_moment_sums(features: jax.Array, weights: jax.Array,
                        sq_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(weights^T @ features, sq_weights^T @ features**2), each (K, D), for
  features (N, D) and weights, sq_weights (N, K)."""
  return (jnp.einsum("nk,nd->kd", weights, features, precision=_EXACT),
          _chunked_square_sums(features, sq_weights))


def _feature_moment_sums_fwd(features, weights, sq_weights):
  features, weights, sq_weights = (x.value for x in (features, weights,
                                                      sq_weights))
  return (feature_moment_sums(features, weights, sq_weights),
          (features, weights, sq_weights))


def _feature_moment_sums_bwd(residuals, cotangents):
  # An unused output's cotangent stays a symbolic zero and its terms are
  # skipped: a dot with a broadcast of zeros is what XLA:CPU's YNNPACK
  # fusion miscompiles in jaxlib 0.10 (docs/troubleshooting.md, "Known XLA
  # issue").
  features, weights, sq_weights = residuals
  g, g_sq = cotangents
  is_zero = lambda c: isinstance(c, jax.custom_derivatives.SymbolicZero)
  elementwise = weights.shape[1] <= _ELEMENTWISE_MAX_COLUMNS
  columns = range(weights.shape[1])
  d_features, d_weights, d_sq_weights = [], None, None
  if not is_zero(g):
    d_features.append(sum(weights[:, k, None] * g[k] for k in columns)
                      if elementwise else
                      jnp.einsum("nk,kd->nd", weights, g, precision=_EXACT))
    d_weights = jnp.einsum("kd,nd->nk", g, features, precision=_EXACT)
  if not is_zero(g_sq):
    d_features.append(
        sum(2.0 * features * sq_weights[:, k, None] * g_sq[k] for k in columns)
        if elementwise else 2.0 * features * jnp.einsum(
            "nk,kd->nd", sq_weights, g_sq, precision=_EXACT))
    d_sq_weights = jnp.concatenate([
        jnp.einsum("kd,nd->nk", g_sq, features[a:b]**2, precision=_EXACT)
        for a, b in _row_chunks(features.shape[0])])
  return (sum(d_features) if d_features else None), d_weights, d_sq_weights


feature_moment_sums.defvjp(_feature_moment_sums_fwd, _feature_moment_sums_bwd,
                           symbolic_zeros=True)


# XLA:CPU's YNNPACK fusion of each dot with its elementwise neighbours (bias,
# ReLU, masks) is experimental and off by default in XLA; results equal the
# unfused step to float32 rounding (tests/test_fast_paths.py), times in
# docs/speed.md.
_CPU_DOT_FUSION = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def cpu_compiler_options(platform: str,
                         dot_fusion: bool) -> dict[str, str] | None:
  """The train step's compiler options on `platform` (None: XLA's own).
  Options this jaxlib's XLA does not know are left out, with a one-line
  note (the option is experimental and may be renamed)."""
  if platform != "cpu" or not dot_fusion:
    return None
  return _known_options(tuple(_CPU_DOT_FUSION.items())) or None


def jit(fun: Callable, platform: str, dot_fusion: bool,
        **jit_kwargs: Any) -> Callable:
  """`jax.jit(fun, **jit_kwargs)`, with the CPU dot fusion where it is safe.

  jaxlib 0.10's YNNPACK fusion miscompiles a dot that reads a broadcast
  inside the fusion, e.g. `a @ broadcast(v)` with `a` of shape (16, 3) and
  128 columns: every call gives other numbers, some NaN (IB_ERM's gradient
  of a per-domain mean has one; docs/troubleshooting.md). So each program
  is compiled with the fusion, checked for such a dot, and compiled without
  the fusion if it has one, with a one-line note.
  """
  options = cpu_compiler_options(platform, dot_fusion)
  if options is None:
    return jax.jit(fun, **jit_kwargs)
  return _CheckedDotFusion(fun, options, jit_kwargs)


class _CheckedDotFusion:
  """`fast_paths.jit`'s function with the dot fusion: `__call__` and
  `lower` as a jitted function's, one program per argument signature."""

  def __init__(self, fun, options, jit_kwargs):
    self._fused = jax.jit(fun, compiler_options=options, **jit_kwargs)
    self._plain = jax.jit(fun, **jit_kwargs)
    self._name = getattr(fun, "__name__", "step")
    self._programs = {}  # argument signature -> the fused executable or None

  def _program(self, args):
    leaves, tree = jax.tree.flatten(args)
    key = (tree, tuple((jax.typeof(x), getattr(x, "sharding", None))
                       for x in leaves))
    if key not in self._programs:
      compiled = self._fused.lower(*args).compile()
      bad = ynn_dots_reading_broadcasts(compiled.as_text())
      if bad:
        print(f"note: compiling {self._name} without XLA:CPU's dot fusion: "
              f"its fused dot(s) {', '.join(bad)} read a broadcast, which "
              "this jaxlib miscompiles.", file=sys.stderr, flush=True)
      self._programs[key] = None if bad else compiled
    return self._programs[key]

  def __call__(self, *args):
    compiled = self._program(args)
    return (self._plain if compiled is None else compiled)(*args)

  def lower(self, *args):
    return (self._plain if self._program(args) is None
            else self._fused).lower(*args)


def ynn_dots_reading_broadcasts(compiled_text: str) -> list[str]:
  """The YNNPACK fusions of a compiled CPU program (its `as_text()`) in
  which a dot reads a broadcast made inside the fusion."""
  found = []
  for name in re.findall(r"fusion\([^)]*\), kind=kCustom, calls=%([\w.\-]+)"
                         r"[^\n]*__ynn_fusion", compiled_text):
    body = re.search(rf"\n%{re.escape(name)} \(.*?\n}}", compiled_text,
                     re.S).group(0)
    broadcasts = set(re.findall(r"%([\w.\-]+) = \S+ broadcast\(", body))
    if any(broadcasts & set(dot.groups()) for dot in re.finditer(
        r"= \S+ dot\(%([\w.\-]+), %([\w.\-]+)\)", body)):
      found.append(name)
  return found


@functools.cache
def _known_options(options: tuple[tuple[str, str], ...]) -> dict[str, str]:
  known = {}
  for name, value in options:
    try:  # a tiny compile: XLA refuses an unknown option by name
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
          np.float32(0)).compile()
      known[name] = value
    except jax.errors.JaxRuntimeError as e:
      if "No such compile option" not in str(e):
        raise
      print(f"note: this JAX ({jax.__version__}) has no XLA option "
            f"{name!r}; compiling without it (xla_cpu_dot_fusion is off).",
            file=sys.stderr, flush=True)
  return known
