"""The one train loop on a toy run: records, window means, one host transfer
per record, progress lines, and resume after a crash."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import algorithms
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax import train


class Crash(RuntimeError):
  pass


def _batch(step):
  rng = np.random.default_rng(step)
  return {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 2, 8), jnp.float32),
          "domain": jnp.asarray(np.repeat([0, 1], 4), jnp.int32)}


def _run(workdir, steps=7, record_every=2, crash_at=None):
  model = models.MLP(hidden_dims=(4,), num_outputs=1)
  algorithm = algorithms.make_algorithm("erm", model, 2)
  tx = train.make_optimizer(0.1)
  mesh = parallel.make_mesh(1)
  params = model.init(jax.random.key(0), _batch(0)["x"][:1])["params"]
  state = parallel.replicate(train.create_train_state(
      jax.random.key(1), params, algorithm, tx, _batch(0)), mesh)

  def batches(start):
    for step in range(start, steps):
      if step == crash_at:
        raise Crash(f"killed at step {step}")
      yield _batch(step)

  step = train.jit_train_step(
      train.make_train_step(algorithm, tx, algorithms.Schedule()), mesh)
  return train.Run(
      workdir=str(workdir), config_json="{}", steps=steps,
      record_every=record_every, state=state, train_step=step,
      batches=batches, evaluate=lambda p: {"test_acc": 0.5},
      fields={"args": {"name": "toy"}}, name="toy")


def test_records_hold_window_means_and_the_loop_syncs_once_per_record(
    tmp_path, monkeypatch, capsys):
  transfers = []
  device_get = jax.device_get
  monkeypatch.setattr(train.jax, "device_get",
                      lambda x: transfers.append(1) or device_get(x))
  records = train.train_loop(_run(tmp_path))
  assert [r["step"] for r in records] == [0, 2, 4, 6]
  assert len(transfers) == len(records)  # not one per step
  # Each record's loss is the mean over the steps since the previous one.
  per_step = []
  state = _run(tmp_path / "again").state
  step_fn = _run(tmp_path / "again").train_step
  for step in range(7):
    state, metrics = step_fn(state, _batch(step))
    per_step.append(float(metrics["loss"]))
  np.testing.assert_allclose([r["loss"] for r in records],
                             [per_step[0], np.mean(per_step[1:3]),
                              np.mean(per_step[3:5]), np.mean(per_step[5:7])],
                             rtol=1e-6)
  assert all(r["test_acc"] == 0.5 and r["args"] == {"name": "toy"}
             for r in records)
  out = capsys.readouterr().out
  assert "toy: compiling the train step..." in out
  assert "eta" in out and "steps/s" in out
  assert os.path.exists(tmp_path / train.DONE)


def test_a_crashed_run_resumes_to_the_same_end(tmp_path, capsys):
  whole = train.train_loop(_run(tmp_path / "whole"))
  with pytest.raises(Crash):
    train.train_loop(_run(tmp_path / "cut", crash_at=5))
  assert not os.path.exists(tmp_path / "cut" / train.DONE)
  resumed = train.train_loop(_run(tmp_path / "cut"))
  assert "Resuming" in capsys.readouterr().out
  strip = lambda rs: [{k: v for k, v in r.items() if k != "step_time"}
                      for r in rs]
  assert strip(resumed) == strip(whole)
  lines = (tmp_path / "cut" / train.RECORDS).read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [0, 2, 4, 6]


def test_a_finished_run_is_not_run_again(tmp_path, capsys):
  first = train.train_loop(_run(tmp_path))
  again = train.train_loop(_run(tmp_path, crash_at=0))  # would crash if run
  assert again == first
  assert "is done" in capsys.readouterr().out


def test_checkpoint_every_must_be_a_multiple_of_record_every(tmp_path):
  run = _run(tmp_path)
  with pytest.raises(ValueError, match="divide checkpoint_every"):
    train.Run(**{**vars(run), "checkpoint_every": 3})


def test_progress_lines_with_eta_when_not_on_a_terminal(tmp_path, capsys):
  train.train_loop(_run(tmp_path, steps=4, record_every=100),
                   progress_every_s=0.0)
  out = capsys.readouterr().out
  assert "toy: step 2/4  eta" in out
