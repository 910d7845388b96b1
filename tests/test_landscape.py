"""Domain-level landscapes (fishr_jax/landscape.py) against BackPACK's
numbers (tests/data/landscape_backpack.npz), jax.hessian, and brute force."""

import itertools
import os

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

from experiments import landscape_vectors
from fishr_jax import landscape
from fishr_jax import losses
from fishr_jax import penalties

BACKPACK = os.path.join(os.path.dirname(__file__), "data",
                        "landscape_backpack.npz")


def _load(path=BACKPACK):
  with np.load(path) as data:
    return dict(data)


def test_equal_to_backpack_in_float64(x64):
  reference = _load()
  errors = landscape_vectors.relative_errors(reference)
  checked = {k for k in reference if k.startswith(("hess.", "var.", "head.",
                                                   "full."))}
  assert set(errors) == checked and len(checked) == 48
  assert max(errors.values()) < 1e-8, errors


def test_the_checker_fails_a_file_off_by_more_than_its_tolerance(
    tmp_path, capsys):
  reference = _load()
  off = reference["hess.full.env1.lin2.weight"]
  off.flat[np.argmax(np.abs(off))] *= 1 + 1e-7
  path = tmp_path / "off.npz"
  np.savez(path, **reference)
  try:
    assert landscape_vectors.main([str(path)]) == 1
    assert landscape_vectors.main([BACKPACK]) == 0
  finally:
    jax.config.update("jax_enable_x64", False)
  out = capsys.readouterr().out
  assert "hess.full.env1.lin2.weight" in out and "> tolerance" in out


def _mlp_file(rng, dims, num_classes, sizes, num_hessian):
  """A file of the BackPACK format whose values come from jax.hessian and
  per-example jax.grad: another model size, three domains."""
  reference = {}
  names = [f"layer{i}" for i in range(len(dims) - 1)] + ["classifier"]
  for name, (d_in, d_out) in zip(names, zip(dims, dims[1:] + [num_classes])):
    reference[f"param.{name}.weight"] = rng.normal(size=(d_out, d_in))
    reference[f"param.{name}.bias"] = rng.normal(size=d_out) * 0.3
  for k, n in enumerate(sizes):
    reference[f"env{k}.x"] = rng.normal(size=(n, dims[0]))
    reference[f"env{k}.y"] = rng.integers(0, num_classes, n)
  reference["num_hessian"] = np.asarray(num_hessian)
  params = landscape_vectors.mlp_params(reference)
  flat, unravel = ravel_pytree(params)
  for k, n in enumerate(sizes):
    x, y = reference[f"env{k}.x"], reference[f"env{k}.y"]

    def loss(flat_params, x_i, y_i, part):
      p = unravel(flat_params)
      if part == "head":  # the featurizer held fixed
        p = {**jax.tree.map(jax.lax.stop_gradient, p),
             "classifier": p["classifier"]}
      return losses.per_example_loss(
          landscape_vectors.mlp_logits(p, x_i[None], "classifier")[0], y_i)

    for part, hess_examples in (("head", n), ("full", num_hessian)):
      each = lambda f, part=part: jax.jit(jax.vmap(
          lambda x_i, y_i: f(loss)(flat, x_i, y_i, part)))
      hessians = jax.vmap(jnp.diag)(each(jax.hessian)(
          x[:hess_examples], y[:hess_examples])).mean(0)
      variance = np.asarray(each(jax.grad)(x, y)).var(0)
      for what, values in (("hess", hessians), ("var", variance)):
        tree = unravel(jnp.asarray(values))
        layers = ["classifier"] if part == "head" else names
        for name in layers:
          reference[f"{what}.{part}.env{k}.{name}.weight"] = np.asarray(
              tree[name]["kernel"]).T
          reference[f"{what}.{part}.env{k}.{name}.bias"] = np.asarray(
              tree[name]["bias"])
  return reference


def test_equal_to_jax_hessian_on_another_model_with_three_domains(x64):
  reference = _mlp_file(np.random.default_rng(1), dims=[5, 6, 4, 3],
                        num_classes=3, sizes=[4, 7, 5], num_hessian=3)
  errors = landscape_vectors.relative_errors(reference)
  assert len(errors) == 3 * 2 * (2 + 4 * 2)  # domains x hess/var x arrays
  assert max(errors.values()) < 1e-10, errors


@pytest.mark.parametrize("num_classes", [1, 4])
def test_hessian_diagonals_equal_jax_hessian_for_all_layers(x64, num_classes):
  """Binary (sigmoid) and softmax heads; a conv + ReLU + pooling network
  too, all piecewise linear in each parameter."""
  rng = np.random.default_rng(num_classes)
  params = {"conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4))),
            "dense": {"kernel": jnp.asarray(rng.normal(size=(4, num_classes))),
                      "bias": jnp.asarray(rng.normal(size=num_classes))}}

  def logits_fn(p, x_i):
    h = jax.lax.conv_general_dilated(x_i[None], p["conv"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h).mean(axis=(1, 2))[0]
    return h @ p["dense"]["kernel"] + p["dense"]["bias"]

  x = jnp.asarray(rng.normal(size=(3, 5, 5, 2)))
  y = jnp.asarray(rng.integers(0, max(num_classes, 2), 3))
  ours = jax.jit(landscape.hessian_diagonals, static_argnums=0)(
      logits_fn, params, x)
  flat, unravel = ravel_pytree(params)
  exact = jax.jit(jax.vmap(lambda x_i, y_i: jnp.diag(jax.hessian(
      lambda f: losses.per_example_loss(logits_fn(unravel(f), x_i), y_i))(
          flat))))(x, y)
  ours_flat = jax.vmap(lambda tree: ravel_pytree(tree)[0])(ours)
  np.testing.assert_allclose(ours_flat, exact, rtol=1e-10, atol=1e-14)


def test_head_curvature_equals_autodiff_per_example_moments(x64):
  rng = np.random.default_rng(3)
  features = jnp.asarray(rng.normal(size=(10, 5)))
  head = {"kernel": jnp.asarray(rng.normal(size=(5, 3))),
          "bias": jnp.asarray(rng.normal(size=3))}
  labels = jnp.asarray(rng.integers(0, 3, 10))
  domain_ids = jnp.asarray([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])
  logits_fn = lambda p, f: f @ p["kernel"] + p["bias"]
  closed = jax.jit(landscape.head_curvature, static_argnums=4)(
      features, logits_fn(head, features), labels, domain_ids, 3)
  generic = jax.jit(landscape.network_curvature, static_argnums=(0, 5))(
      logits_fn, head, features, labels, domain_ids, 3)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12,
                                                  atol=1e-15)
  jax.tree.map(close, closed, generic)
  grads = penalties.per_example_grads(
      lambda p, f, y: losses.per_example_loss(logits_fn(p, f), y), head,
      features, labels)
  bias = np.asarray(grads["bias"])
  np.testing.assert_allclose(
      closed.fisher["bias"][1],
      (bias[np.asarray(domain_ids) == 1] ** 2).mean(0), rtol=1e-12)


def test_compare_is_the_mean_and_worst_over_pairs():
  v = np.random.default_rng(4).normal(size=(4, 6)).astype(np.float32)
  quantity = {"a": jnp.asarray(v[:, :2]), "b": jnp.asarray(v[:, 2:])}
  got = landscape.compare(quantity)
  pairs = list(itertools.combinations(range(4), 2))
  distance = [np.sum((v[a] - v[b]) ** 2) for a, b in pairs]
  cosine = [v[a] @ v[b] / np.linalg.norm(v[a]) / np.linalg.norm(v[b])
            for a, b in pairs]
  gap = [(v[a] @ v[a] - v[b] @ v[b]) ** 2 for a, b in pairs]
  expected = {"distance": np.mean(distance), "distance_max": np.max(distance),
              "cosine": np.mean(cosine), "cosine_min": np.min(cosine),
              "norm_gap": np.mean(gap), "norm_gap_max": np.max(gap),
              "to_mean": np.sum((v - v.mean(0)) ** 2),
              "meannorm": np.mean(np.sum(v * v, 1))}
  assert set(got) == set(expected)
  two = landscape.compare(jax.tree.map(lambda a: a[:2], quantity))
  assert set(two) == {"distance", "cosine", "norm_gap", "to_mean", "meannorm"}
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=2e-5, err_msg=key)
  with pytest.raises(ValueError, match="two or more"):
    landscape.compare({"a": jnp.ones((1, 3))})


def test_inconsistency_is_the_maximum_of_the_quadratic_model():
  rng = np.random.default_rng(5)
  risks = jnp.asarray([0.3, 0.5, 0.2])
  h = rng.uniform(0.1, 2.0, size=(3, 4))
  eps = 0.01
  score = float(landscape.inconsistency(risks, {"w": jnp.asarray(h)}, eps))
  best = -np.inf
  for a, b in itertools.permutations(range(3), 2):
    # Points on A's level set R_A + eps: d = u / sqrt(h_A), ||u||^2 = 2 eps.
    u = rng.normal(size=(20000, 4))
    u *= np.sqrt(2 * eps) / np.linalg.norm(u, axis=1, keepdims=True)
    d = u / np.sqrt(h[a])
    rise = 0.5 * np.sum(h[b] * d * d, axis=1)
    assert rise.max() <= eps * np.max(h[b] / h[a]) * (1 + 1e-6)
    j = np.argmax(h[b] / h[a])  # the maximizer: the whole budget on j
    d_star = np.zeros(4)
    d_star[j] = np.sqrt(2 * eps / h[a][j])
    best = max(best, float(risks[b] - risks[a])
               + 0.5 * np.sum(h[b] * d_star ** 2))
  np.testing.assert_allclose(score, best, rtol=1e-5)
  flat_in_a = h.copy()
  flat_in_a[0, 1] = 0.0
  assert np.isinf(landscape.inconsistency(risks, {"w": jnp.asarray(flat_in_a)},
                                          eps))
  flat_in_both = h.copy()
  flat_in_both[:, 1] = 0.0
  assert np.isfinite(landscape.inconsistency(
      risks, {"w": jnp.asarray(flat_in_both)}, eps))


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunking_never_changes_the_network_quantities(x64, chunk_size):
  rng = np.random.default_rng(6)
  params = {"hidden": jnp.asarray(rng.normal(size=(4, 5))),
            "head": jnp.asarray(rng.normal(size=(5, 3)))}
  logits_fn = lambda p, x_i: jax.nn.relu(x_i @ p["hidden"]) @ p["head"]
  x = jnp.asarray(rng.normal(size=(11, 4)))
  labels = jnp.asarray(rng.integers(0, 3, 11))
  domain_ids = jnp.asarray(rng.integers(0, 3, 11))
  subset = jnp.asarray(rng.random(11) < 0.6)
  run = jax.jit(landscape.network_curvature, static_argnums=(0, 5, 7))
  plain = run(logits_fn, params, x, labels, domain_ids, 3, subset, None)
  chunked = run(logits_fn, params, x, labels, domain_ids, 3, subset,
                chunk_size)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12,
                                                       atol=1e-15),
               plain, chunked)


def test_record_fields_name_each_part_quantity_and_statistic():
  from fishr_jax import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  module = models.MLP(hidden_dims=(5,), num_outputs=1)
  params = module.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
  forward = lambda p, x: module.apply({"params": p}, x)
  batch = {"x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 2, 8), jnp.float32),
           "domain": jnp.asarray([0, 1] * 4)}
  head = landscape.record_fields(forward, params, batch, 2)
  both = landscape.record_fields(forward, params, batch, 2, layers="all",
                                 chunk_size=3)
  assert len(head) == 3 * 5 and "landscape/head/hessian_distance" in head
  assert set(both) == set(head) | {k.replace("/head/", "/all/") for k in head}
  # The head's part of "all" measures the head's own parameters.
  features, logits = forward(params, batch["x"])
  expected = landscape.compare(landscape.head_curvature(
      features, logits, batch["y"], batch["domain"], 2).variance)
  np.testing.assert_allclose(head["landscape/head/fishr_distance"],
                             expected["distance"], rtol=1e-6)
  with pytest.raises(ValueError, match="layers must be one of"):
    landscape.record_fields(forward, params, batch, 2, layers="conv")


# ------------------------------------------------------------- in training


def _records(workdir):
  from fishr_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  return workdir_lib.read_records(workdir)


def _split(records):
  """(the records without timings and diagnostics, the diagnostics)."""
  return ([{k: v for k, v in r.items()
            if k != "step_time" and not k.startswith("landscape/")}
           for r in records],
          [{k: v for k, v in r.items() if k.startswith("landscape/")}
           for r in records])


def _colored_mnist(tiny_mnist_dir, **changes):
  from configs import colored_mnist  # pylint: disable=g-import-not-at-top
  config = colored_mnist.get_config()
  config.update(**{**dict(restarts=2, steps=7, hidden_dim=8, log_every=2,
                          checkpoint_every=2, penalty_anneal_iters=3),
                   **changes})
  config.data.update(source="idx", data_dir=tiny_mnist_dir)
  return config


@pytest.mark.parametrize("runs_per_program", [1, 0])
def test_diagnostics_never_change_colored_mnist_training(
    tiny_mnist_dir, tmp_path, runs_per_program):
  from fishr_jax import train_colored_mnist  # pylint: disable=g-import-not-at-top
  off, on = str(tmp_path / "off"), str(tmp_path / "on")
  train_colored_mnist.train_and_evaluate(
      _colored_mnist(tiny_mnist_dir, runs_per_program=runs_per_program), off)
  train_colored_mnist.train_and_evaluate(
      _colored_mnist(tiny_mnist_dir, runs_per_program=runs_per_program,
                     diagnostics_every=4, diagnostics_layers="all"), on)
  for restart in range(2):
    plain, none = _split(_records(os.path.join(off, f"restart_{restart}")))
    with_them, diagnostics = _split(
        _records(os.path.join(on, f"restart_{restart}")))
    assert with_them == plain  # bitwise: the same programs, the same data
    assert not any(none)
    assert [r["step"] for r, d in zip(plain, diagnostics) if d] == [0, 4, 6]
    assert len(diagnostics[0]) == 2 * 3 * 5  # head and all layers
    assert all(np.isfinite(v) for d in diagnostics for v in d.values())


def test_diagnostics_never_change_domainbed_training(tiny_mnist_dir,
                                                     tmp_path):
  from configs import domainbed  # pylint: disable=g-import-not-at-top
  from fishr_jax import train_domainbed  # pylint: disable=g-import-not-at-top

  def config(**changes):
    c = domainbed.get_config()
    c.update(steps=3, checkpoint_freq=2, digits_source="idx",
             data_dir=tiny_mnist_dir, **changes)
    c.hparams.batch_size = 8
    return c

  train_domainbed.train_and_evaluate(config(), str(tmp_path / "off"))
  train_domainbed.train_and_evaluate(
      config(diagnostics_every=2, diagnostics_examples=5),
      str(tmp_path / "on"))
  plain, _ = _split(_records(str(tmp_path / "off")))
  with_them, diagnostics = _split(_records(str(tmp_path / "on")))
  assert with_them == plain
  assert [sorted(d) for d in diagnostics] == [sorted(diagnostics[0])] * 2
  assert "landscape/head/hessian_distance" in diagnostics[0]


def test_diagnostics_on_two_devices_equal_those_on_one(tiny_mnist_dir,
                                                       tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from fishr_jax import train_colored_mnist  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  flags = dict(restarts=1, diagnostics_every=2, diagnostics_layers="all")
  one = str(tmp_path / "one")
  train_colored_mnist.train_and_evaluate(
      _colored_mnist(tiny_mnist_dir, **flags), one)
  two = str(tmp_path / "two")
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  result = subprocess.run(
      [sys.executable, "-m", "fishr_jax.main", "--config",
       os.path.join(root, "configs", "colored_mnist.py"), "--workdir", two,
       "--config.num_devices=2", "--config.data.source=idx",
       f"--config.data.data_dir={tiny_mnist_dir}",
       *(f"--config.{k}={v}" for k, v in dict(
           steps=7, hidden_dim=8, log_every=2, checkpoint_every=2,
           penalty_anneal_iters=3, **flags).items())],
      cwd=root, env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  _, expected = _split(_records(os.path.join(one, "restart_0")))
  _, got = _split(_records(os.path.join(two, "restart_0")))
  assert [sorted(d) for d in got] == [sorted(d) for d in expected]
  for a, b in zip(expected, got):
    np.testing.assert_allclose([b[k] for k in a], list(a.values()),
                               rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("changes, message", [
    ({"diagnostics_every": 3}, "diagnostics_every=3: must be 0 .off. or a "
     "multiple of log_every=50"),
    ({"diagnostics_layers": "conv"}, "diagnostics_layers"),
])
def test_bad_diagnostics_fields_are_config_errors(changes, message):
  from configs import colored_mnist  # pylint: disable=g-import-not-at-top
  from fishr_jax import config_checks  # pylint: disable=g-import-not-at-top
  from fishr_jax import errors  # pylint: disable=g-import-not-at-top
  config = colored_mnist.get_config()
  config.update(changes)
  with pytest.raises(errors.ConfigError, match=message):
    config_checks.check(config)


def test_bad_diagnostics_examples_is_a_config_error():
  from configs import domainbed  # pylint: disable=g-import-not-at-top
  from fishr_jax import config_checks  # pylint: disable=g-import-not-at-top
  from fishr_jax import errors  # pylint: disable=g-import-not-at-top
  config = domainbed.get_config()
  config.diagnostics_examples = 1
  with pytest.raises(errors.ConfigError, match="diagnostics_examples=1"):
    config_checks.check(config)
  config.diagnostics_examples = 2
  config.diagnostics_every = 150  # ColoredMNIST records every 100 steps
  with pytest.raises(errors.ConfigError, match="checkpoint_freq=100"):
    config_checks.check(config)


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("norm", [False, True])
def test_all_layers_equal_the_per_example_path(x64, num_classes, norm):
  """Conv and Dense layers in closed form, a GroupNorm's scale and bias per
  example: equal to network_curvature over every parameter."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                          param_dtype=jnp.float64)(x))
      if norm:
        h = nn.GroupNorm(num_groups=2, param_dtype=jnp.float64)(h)
      h = nn.relu(nn.Dense(5, param_dtype=jnp.float64)(h.mean(axis=(1, 2))))
      return h, nn.Dense(num_classes, param_dtype=jnp.float64,
                         name="classifier")(h)

  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(9, 6, 6, 2)))
  labels = jnp.asarray(rng.integers(0, max(num_classes, 2), 9))
  domain_ids = jnp.asarray([0, 1, 2] * 3)
  module = Net()
  params = module.init(jax.random.key(0), x[:1])["params"]
  if norm:  # not the init's 1 and 0, so their gradients are not special
    params["GroupNorm_0"] = {"scale": jnp.asarray(rng.normal(size=4)),
                             "bias": jnp.asarray(rng.normal(size=4))}
  forward = lambda p, x_: module.apply({"params": p}, x_)
  assert sorted(landscape.closed_form_layers(params)) == [
      "Conv_0", "Dense_0", "classifier"]
  fast = jax.jit(landscape.all_layers_curvature, static_argnums=(0, 5, 6))(
      forward, params, x, labels, domain_ids, 3, 4)
  plain = jax.jit(landscape.network_curvature, static_argnums=(0, 5))(
      lambda p, x_i: forward(p, x_i[None])[1][0], params, x, labels,
      domain_ids, 3)
  assert jax.tree.structure(fast) == jax.tree.structure(plain)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9,
                                                       atol=1e-14),
               fast, plain)


@pytest.mark.slow
def test_the_experiment_writes_its_plots_json_and_table(tmp_path):
  """experiments/landscape.py, shortened; then its DomainBed mode over
  run folders (here its own Colored MNIST runs')."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "out"
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "experiments.landscape", *args], cwd=root,
      capture_output=True, text=True, check=False)
  result = run("--output_dir", str(out), "--restarts", "1", "--steps", "11",
               "--every", "10", "--algorithms", "erm,fishr")
  assert result.returncode == 0, result.stderr
  for name in ("landscape_head.png", "landscape_all.png",
               "landscape_cosine.png", "landscape.md"):
    assert (out / name).stat().st_size > 0, name
  curves = json.loads((out / "landscape.json").read_text())
  assert set(curves) == {"erm", "fishr", "cost"}
  assert curves["fishr"]["step"] == [0, 10]
  for key in ("head/hessian_distance", "all/fishr_distance_std",
              "head/hessian_cosine_min", "test_acc"):
    assert len(curves["erm"][key]) == 2, key
  assert curves["cost"]["all_s"] > 0 and curves["cost"]["examples"] == 4000
  table = (out / "landscape.md").read_text()
  assert "| ERM | 0 |" in table and "| Fishr | 0 |" in table
  # Its DomainBed mode reads any run folders whose records hold them.
  result = run("--domainbed_runs", str(out / "fishr"), "--output_dir",
               str(tmp_path / "db"))
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "db" / "landscape_domainbed.png").stat().st_size > 0
  result = run("--domainbed_runs", str(tmp_path / "db"), "--output_dir",
               str(tmp_path / "db"))
  assert result.returncode != 0 and "No run under" in result.stderr
