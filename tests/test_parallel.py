"""Data parallelism: 1, 2, 4 and 8 (fake CPU) devices give the one-device
numbers; the batch layout spreads every domain over the devices."""

import numpy as np
import pytest

from fishr_jax import parallel
from tests import conftest
from tests import multi_device_run


@pytest.fixture(scope="module")
def multi_device_results(tmp_path_factory):
  folder = conftest.made_in_background(tmp_path_factory, "multi_device")
  return dict(np.load(folder / "results.npz"))


def _assert_close(got, want, what):
  assert np.all(np.isfinite(want)), what
  scale = np.abs(want).max()
  assert scale > 0, what
  # Float32 sums in another order: agreement to a few ulps of the largest.
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale,
                             err_msg=what)


def _keys(variant):
  keys = ["loss", "params"]
  if variant.startswith("fishr"):
    keys += ["penalty", "ema", "grads"]
  return keys


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(multi_device_run.VARIANTS))
@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_sharded_steps_equal_single_device(multi_device_results, variant,
                                           num_devices):
  for key in _keys(variant):
    _assert_close(multi_device_results[f"{variant}/{num_devices}/{key}"],
                  multi_device_results[f"{variant}/None/{key}"],
                  f"{variant} on {num_devices}: {key}")
  if variant.startswith("fishr"):
    assert multi_device_results[f"{variant}/None/penalty"] > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(
    v for v, (_, _, ref) in multi_device_run.VARIANTS.items() if ref))
@pytest.mark.parametrize("num_devices", [None, 1, 2, 4, 8])
def test_fast_paths_equal_the_reference_on_every_mesh(multi_device_results,
                                                      variant, num_devices):
  reference = multi_device_run.VARIANTS[variant][2]
  for key in _keys(variant):
    _assert_close(multi_device_results[f"{variant}/{num_devices}/{key}"],
                  multi_device_results[f"{reference}/None/{key}"],
                  f"{variant} on {num_devices} vs {reference}: {key}")


@pytest.mark.perf
@pytest.mark.parametrize("variant", ["fishr_closed_form",
                                     "fishr_closed_form_fast", "fishr_vmap",
                                     "fishr_all_layers_fast", "erm"])
def test_sharded_step_reduces_and_never_gathers_the_batch(multi_device_results,
                                                          variant):
  for n in (2, 4, 8):
    has_all_reduce, has_all_gather = multi_device_results[
        f"{variant}/{n}/collectives"]
    assert has_all_reduce and not has_all_gather, (variant, n)


def test_spread_domains_lays_out_each_shard_domain_by_domain():
  domains = np.repeat(np.arange(3, dtype=np.int32), [8, 4, 12])
  order = parallel.spread_domains(domains, 4)
  assert sorted(order) == list(range(len(domains)))
  for shard in domains[order].reshape(4, -1):
    np.testing.assert_array_equal(shard, [0, 0, 1, 2, 2, 2])
  for d in range(3):  # each domain's examples keep their relative order
    picked = order[domains[order] == d]
    assert np.all(np.diff(picked) > 0)


def test_spread_domains_interleaves_and_keeps_order():
  domains = np.array([0] * 6 + [1] * 10 + [2] * 8, np.int32)
  order = parallel.spread_domains(domains, 4)
  assert sorted(order) == list(range(len(domains)))
  shards = domains[order].reshape(4, -1)
  for shard in shards:
    assert set(shard.tolist()) == {0, 1, 2}
  for d in range(3):  # each domain's examples keep their relative order
    picked = order[domains[order] == d]
    assert np.all(np.diff(picked) > 0)


def test_one_device_keeps_the_batch_order():
  domains = np.repeat(np.arange(3, dtype=np.int32), [4, 6, 2])
  np.testing.assert_array_equal(parallel.spread_domains(domains, 1),
                                np.arange(12))


def test_spread_domains_rejects_uneven_split():
  with pytest.raises(ValueError, match="cannot be split evenly over 5"):
    parallel.spread_domains(np.zeros(12, np.int32), 5)


def test_make_mesh_rejects_missing_devices():
  with pytest.raises(ValueError, match="devices"):
    parallel.make_mesh(10_000)


def test_process_parts_cover_the_batch_and_every_domain():
  domains = np.repeat(np.arange(3, dtype=np.int32), [8, 4, 12])
  batch = {"domain": domains, "x": np.arange(len(domains))}
  parts = [parallel.process_part(batch, i, 4) for i in range(4)]
  rows = np.concatenate([p["x"] for p in parts])
  assert sorted(rows.tolist()) == list(range(len(domains)))
  for part in parts:
    assert len(part["x"]) == 6 and set(part["domain"].tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(part["domain"], domains[part["x"]])
  assert parallel.process_part(batch, 0, 1) is batch
