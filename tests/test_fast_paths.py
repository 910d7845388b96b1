"""Every fast form of the moments equals the reference math, jitted, with its
gradient; the layout the block sums need is checked where the batch is made.

(1/2/4/8 devices: tests/multi_device_run.py and tests/test_parallel.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import fast_paths
from fishr_jax import losses
from fishr_jax import parallel
from fishr_jax import penalties

NUM_DOMAINS = 3
FAST = ("domain_blocks", "chunked", "auto")


def _dense_problem(num_columns, per_domain=6, num_shards=1, dim=5, seed=0):
  """Inputs and signals of a Dense layer on a batch laid out as the loaders
  give it, over `num_shards` device slices."""
  rng = np.random.default_rng(seed)
  n = NUM_DOMAINS * per_domain * num_shards
  domain = np.tile(np.repeat(np.arange(NUM_DOMAINS), per_domain), num_shards)
  inputs = rng.normal(size=(n, dim)) * (1.0 + domain[:, None])
  signals = rng.normal(size=(n, num_columns)) + domain[:, None]
  return (jnp.asarray(inputs, jnp.float32), jnp.asarray(signals, jnp.float32),
          jnp.asarray(domain, jnp.int32))


def _penalty_fn(variance_fn, domain, centered):
  def penalty(inputs, signals):
    v = variance_fn(inputs, signals, domain, NUM_DOMAINS, centered)
    return penalties.fishr_penalty(v)
  return penalty


@pytest.mark.parametrize("num_shards", [1, 2])
@pytest.mark.parametrize("num_columns", [1, 3])
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("moment_sums", FAST)
def test_fast_moments_equal_the_reference_under_jit(moment_sums, centered,
                                                    num_columns, num_shards):
  inputs, signals, domain = _dense_problem(num_columns, num_shards=num_shards)
  fast = fast_paths.dense_grad_variance_fn(moment_sums, "cpu", num_shards)
  reference = penalties.dense_grad_variance
  got = jax.jit(fast, static_argnums=(3, 4))(inputs, signals, domain,
                                             NUM_DOMAINS, centered)
  want = reference(inputs, signals, domain, NUM_DOMAINS, centered)
  for leaf in ("kernel", "bias"):
    np.testing.assert_allclose(got[leaf], want[leaf], rtol=2e-5, atol=1e-5)
  grad = lambda fn: jax.jit(jax.grad(_penalty_fn(fn, domain, centered),
                                     argnums=(0, 1)))(inputs, signals)
  for a, b in zip(grad(fast), grad(reference)):
    assert float(jnp.abs(b).max()) > 0
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


@pytest.mark.perf
def test_auto_takes_the_chunked_sums_for_few_columns_on_cpu_only():
  inputs, signals, domain = _dense_problem(1)
  jaxpr = lambda fn: str(jax.make_jaxpr(jax.grad(
      _penalty_fn(fn, domain, True)))(inputs, signals))
  assert "custom_vjp" in jaxpr(fast_paths.dense_grad_variance_fn("auto", "cpu"))
  assert "custom_vjp" not in jaxpr(
      fast_paths.dense_grad_variance_fn("auto", "gpu"))
  assert (fast_paths.dense_grad_variance_fn("reference", "cpu")
          is penalties.dense_grad_variance)


def test_chunked_sums_take_any_layout():
  inputs, signals, domain = _dense_problem(2, per_domain=7)
  order = np.random.default_rng(1).permutation(len(domain))
  inputs, signals, domain = inputs[order], signals[order], domain[order]
  got = fast_paths.chunked_dense_grad_variance(inputs, signals, domain,
                                               NUM_DOMAINS)
  want = penalties.dense_grad_variance(inputs, signals, domain, NUM_DOMAINS)
  for leaf in ("kernel", "bias"):
    np.testing.assert_allclose(got[leaf], want[leaf], rtol=2e-5, atol=1e-5)


def test_unknown_moment_sums_and_bad_block_sizes_are_explained():
  with pytest.raises(ValueError, match="moment_sums must be one of"):
    fast_paths.dense_grad_variance_fn("fastest", "cpu")
  inputs, signals, domain = _dense_problem(3)
  with pytest.raises(ValueError, match="equal domain blocks"):
    fast_paths.blocked_dense_grad_variance(inputs[:-1], signals[:-1],
                                           domain[:-1], NUM_DOMAINS)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_the_batch_layout_is_checked_where_the_batch_is_made(num_shards):
  domain = np.tile(np.repeat(np.arange(NUM_DOMAINS), 4), num_shards)
  parallel.check_domain_blocks(domain, NUM_DOMAINS, num_shards)
  for broken in (np.random.default_rng(0).permutation(domain),  # shuffled
                 np.sort(np.concatenate([domain, [0] * num_shards]))):  # unequal
    with pytest.raises(ValueError, match="moment_sums=reference"):
      parallel.check_domain_blocks(broken, NUM_DOMAINS, num_shards)


def test_shard_batch_refuses_a_broken_layout_for_block_sums():
  mesh = parallel.make_mesh(1)
  batch = {"x": np.zeros((7, 2), np.float32), "y": np.zeros(7, np.int32),
           "domain": np.array([0, 0, 0, 1, 1, 2, 2], np.int32)}
  parallel.shard_batch(batch, mesh)  # any layout without the promise
  with pytest.raises(ValueError, match=r"domain sizes \[3, 2, 2\]"):
    parallel.shard_batch(batch, mesh, domain_blocks=True, num_domains=3)


def test_cpu_compiler_options_only_on_cpu_when_asked():
  assert fast_paths.cpu_compiler_options("cpu", True)
  assert fast_paths.cpu_compiler_options("cpu", False) is None
  assert fast_paths.cpu_compiler_options("gpu", True) is None


def test_a_fused_dot_reading_a_broadcast_is_compiled_without_the_fusion(
    capsys):
  """jaxlib 0.10's YNNPACK dot fusion miscompiles `a @ broadcast(v)` at
  these shapes (other numbers on every call); `fast_paths.jit` finds such a
  dot in the compiled program and compiles it unfused, with a note. The
  arrays live on the CPU, so the programs are XLA:CPU's on any machine."""
  rng = np.random.default_rng(0)
  cpu = jax.devices("cpu")[0]
  a = jax.device_put(np.float32(rng.normal(size=(16, 3))), cpu)
  v = jax.device_put(np.float32(rng.normal(size=(3,))), cpu)

  def fn(a, v):
    return jnp.matmul(a, jnp.broadcast_to(v[:, None], (3, 128)),
                      precision="highest")

  fused = jax.jit(fn, compiler_options=fast_paths.cpu_compiler_options(
      "cpu", True))
  assert fast_paths.ynn_dots_reading_broadcasts(
      fused.lower(a, v).compile().as_text())
  checked = fast_paths.jit(fn, "cpu", dot_fusion=True)
  expected = np.asarray(a) @ np.broadcast_to(np.asarray(v)[:, None], (3, 128))
  for _ in range(5):
    np.testing.assert_allclose(checked(a, v), expected, rtol=1e-6, atol=1e-6)
  assert "compiling fn without XLA:CPU's dot fusion" in capsys.readouterr().err
  # ...and a program without such a dot keeps the fusion, with no note.
  dense = fast_paths.jit(lambda a, w: a @ w + 1.0, "cpu", dot_fusion=True)
  w = jax.device_put(np.ones((3, 128), np.float32), cpu)
  assert "__ynn_fusion" in dense.lower(a, w).compile().as_text()
  np.testing.assert_allclose(dense(a, w), np.asarray(a) @ np.asarray(w) + 1,
                             rtol=1e-6)
  assert not capsys.readouterr().err


def test_bfloat16_inputs_take_float32_moments():
  inputs, signals, domain = _dense_problem(3)
  for moment_sums in FAST:
    fn = fast_paths.dense_grad_variance_fn(moment_sums, "cpu")
    got = fn(inputs.astype(jnp.bfloat16), signals.astype(jnp.bfloat16),
             domain, NUM_DOMAINS)
    assert {v.dtype for v in got.values()} == {jnp.dtype(jnp.float32)}
    assert losses.at_least_float32(inputs.astype(jnp.bfloat16)).dtype == jnp.float32


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("moment_sums", ("reference",) + FAST)
def test_jitted_penalty_gradient_at_a_full_batch_scale(moment_sums, centered):
  """At 2 x 5,000 rows XLA:CPU fuses the backward dots with their reductions
  (where jaxlib 0.10 miscompiled a dot with a broadcast of zeros, which the
  not-centered moments' unused sums once fed it): jitted equals eager."""
  inputs, signals, domain = _dense_problem(1, per_domain=5000, dim=64, seed=3)
  domain = domain % 2  # two domains of 5,000 (Colored MNIST's layout)
  domain = jnp.sort(domain)
  fn = fast_paths.dense_grad_variance_fn(moment_sums, "cpu")

  def penalty(inputs, signals):
    return penalties.fishr_penalty(fn(inputs, signals, domain, 2, centered))

  eager = jax.grad(penalty, argnums=(0, 1))(inputs, signals)
  for _ in range(2):  # the miscompile read stale memory: differed per call
    jitted = jax.jit(jax.grad(penalty, argnums=(0, 1)))(inputs, signals)
    for a, b in zip(jitted, eager):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-9 * float(
          jnp.abs(b).max()))


def test_an_xla_option_this_jax_lacks_is_left_out_with_a_note(
    monkeypatch, capsys):
  monkeypatch.setattr(fast_paths, "_CPU_DOT_FUSION",
                      {"xla_cpu_option_no_jax_has": "1"})
  assert fast_paths.cpu_compiler_options("cpu", True) is None
  assert "has no XLA option 'xla_cpu_option_no_jax_has'" in (
      capsys.readouterr().err)
  monkeypatch.undo()
  options = fast_paths.cpu_compiler_options("cpu", True)
  assert options == fast_paths._CPU_DOT_FUSION  # this JAX knows the real one
  assert fast_paths.cpu_compiler_options("gpu", True) is None
