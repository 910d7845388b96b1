"""The one train loop on a toy run: records, window means, one host transfer
per record, progress lines, and resume after a crash."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fishr_jax import algorithms
from fishr_jax import errors
from fishr_jax import model_selection
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax import train
from fishr_jax import workdir
from fishr_jax import optimizers


class Crash(RuntimeError):
  pass


def _batch(step):
  rng = np.random.default_rng(step)
  return {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 2, 8), jnp.float32),
          "domain": jnp.asarray(np.repeat([0, 1], 4), jnp.int32)}


def _run(workdir, steps=7, record_every=2, crash_at=None, nan_at=None,
         config_json="{}"):
  model = models.MLP(hidden_dims=(4,), num_outputs=1)
  algorithm = algorithms.make_algorithm("erm", model, 2)
  tx = optimizers.make(optimizers.ADAM, 0.1)
  mesh = parallel.make_mesh(1)
  params = model.init(jax.random.key(0), _batch(0)["x"][:1])["params"]
  state = parallel.replicate(train.create_train_state(
      jax.random.key(1), params, algorithm, tx, _batch(0)), mesh)

  def batches(start):
    for step in range(start, steps):
      if step == crash_at:
        raise Crash(f"killed at step {step}")
      batch = _batch(step)
      if step == nan_at:
        batch["x"] = batch["x"].at[0, 0].set(jnp.nan)
      yield batch

  step = train.jit_train_step(
      train.make_train_step(algorithm, tx, algorithms.Schedule()), mesh)
  return train.Run(
      workdir=str(workdir), config_json=config_json, steps=steps,
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


def test_the_eta_counts_an_evaluation_per_record_not_per_step(monkeypatch):
  """2001 steps, a record every 500 (DomainBed's 5 evaluations): after step
  0's update (1 s) and evaluation (60 s), 2000 steps and 4 evaluations are
  left, not 2000 of each."""
  now = [1000.0]
  monkeypatch.setattr(train.time, "time", lambda: now[0])
  progress = train.Progress("toy", steps=2001, start_step=0, record_every=500)
  progress.start()
  now[0] += 1.0 + 60.0
  progress.record({"step": 0, "step_time": 1.0})
  assert progress.eta(0) == pytest.approx(2000 * 1.0 + 4 * 60.0)
  now[0] += 250 * 1.0  # between records: the steps so far are not records
  assert progress.eta(250) == pytest.approx(1750 * 1.0 + 4 * 60.0)
  now[0] += 250 * 1.0 + 60.0  # steps 251..500, the record at step 500
  progress.record({"step": 500, "step_time": 1.0}, name="run 0")
  progress.record({"step": 500, "step_time": 1.0}, name="run 1")  # a group
  assert progress.eta(500) == pytest.approx(1500 * 1.0 + 3 * 60.0)
  assert progress.eta(2000) is None


# ------------------------------------------------- when something goes wrong


def _strip(records):
  return [{k: v for k, v in r.items() if k != "step_time"} for r in records]


def _checkpoint_steps(run_dir):
  return sorted(int(d) for d in os.listdir(run_dir / train.CHECKPOINTS)
                if d.isdigit())


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  with pytest.raises(errors.DivergedError,
                     match=r"toy diverged by step 4: loss=nan.*non-finite "
                     r"parameters. Not marked done; its last good checkpoint"):
    train.train_loop(_run(tmp_path, nan_at=3))
  assert not os.path.exists(tmp_path / train.DONE)
  assert _checkpoint_steps(tmp_path) == [1, 3]  # none after the NaN
  records = workdir.read_records(str(tmp_path))
  assert [r["step"] for r in records] == [0, 2, 4]  # the evidence is kept
  assert model_selection.non_finite(records) == ["step 4: loss=nan",
                                                 "step 4: nll=nan"]


def test_a_second_process_is_refused_and_a_dead_ones_lock_taken_over(
    tmp_path, capsys):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from fishr_jax import workdir\n"
       f"with workdir.lock({str(tmp_path)!r}):\n"
       "  print('held', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    assert workdir.is_locked(str(tmp_path))
    with pytest.raises(errors.WorkdirBusyError,
                       match=rf"{tmp_path} is in use by pid {holder.pid} on "):
      train.train_loop(_run(tmp_path))
    assert not os.path.exists(tmp_path / train.RECORDS)  # nothing written
    with pytest.raises(errors.WorkdirBusyError, match="cannot be moved"):
      workdir.move_aside(str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  # The kernel dropped the dead holder's flock; its lock file remains.
  (tmp_path / workdir.LOCK).write_text(json.dumps(
      {"pid": holder.pid, "host": "vm", "since": "then"}))
  assert not workdir.is_locked(str(tmp_path))
  train.train_loop(_run(tmp_path))
  assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out
  assert not os.path.exists(tmp_path / workdir.LOCK)  # released at the end


def test_resume_refuses_another_config_but_not_another_device_count(tmp_path):
  with pytest.raises(Crash):
    train.train_loop(_run(tmp_path, crash_at=3, config_json='{"lr": 0.1}'))
  with pytest.raises(errors.WorkdirError,
                     match=r"another config, so it cannot be resumed: lr: "
                     r"recorded 0.1, now 0.2. .*--fresh"):
    train.train_loop(_run(tmp_path, config_json='{"lr": 0.2}'))
  records = train.train_loop(
      _run(tmp_path, config_json='{"lr": 0.1, "num_devices": 2}'))
  assert [r["step"] for r in records] == [0, 2, 4, 6]
  # Finished, it is not reported done under another config either.
  with pytest.raises(errors.WorkdirError, match="lr: recorded 0.1, now 0.2"):
    train.train_loop(_run(tmp_path, config_json='{"lr": 0.2}'))


def test_a_deleted_done_with_the_last_checkpoint_trains_nothing(
    tmp_path, capsys):
  first = train.train_loop(_run(tmp_path))
  os.remove(tmp_path / train.DONE)
  again = train.train_loop(_run(tmp_path, crash_at=0))  # would crash if run
  assert "nothing is left to train; marking it done" in capsys.readouterr().out
  assert _strip(again) == _strip(first)
  assert os.path.exists(tmp_path / train.DONE)


def test_a_torn_last_record_is_dropped_with_a_warning(tmp_path, capsys):
  whole = train.train_loop(_run(tmp_path / "whole"))
  with pytest.raises(Crash):
    train.train_loop(_run(tmp_path / "cut", crash_at=5))
  with open(tmp_path / "cut" / train.RECORDS, "a") as f:
    f.write('{"step": 6, "lo')  # a writer killed mid-line
  resumed = train.train_loop(_run(tmp_path / "cut"))
  assert "line 4 is cut short" in capsys.readouterr().err
  assert _strip(resumed) == _strip(whole)


def _corrupt(checkpoint_dir, how):
  if how == "truncated array":
    files = [p for p in glob.glob(f"{checkpoint_dir}/**", recursive=True)
             if os.path.isfile(p)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
      f.truncate(os.path.getsize(biggest) // 2)
  else:  # a zero-byte _METADATA
    open(os.path.join(checkpoint_dir, "default", "_METADATA"), "w").close()


@pytest.mark.parametrize("how", ["truncated array", "empty _METADATA"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(
    tmp_path, capsys, how):
  whole = train.train_loop(_run(tmp_path / "whole"))
  run_dir = tmp_path / "cut"
  train.train_loop(_run(run_dir))
  os.remove(run_dir / train.DONE)
  assert _checkpoint_steps(run_dir) == [5, 7]
  _corrupt(run_dir / train.CHECKPOINTS / "7", how)
  resumed = train.train_loop(_run(run_dir))
  err = capsys.readouterr().err
  assert "the checkpoint of step 7 cannot be read" in err
  assert f"moved it to {run_dir / train.CORRUPT_CHECKPOINTS}" in err
  assert _strip(resumed) == _strip(whole)  # resumed from step 5
  assert _checkpoint_steps(run_dir) == [5, 7]


def test_no_readable_checkpoint_is_an_error_then_a_fresh_start(tmp_path):
  train.train_loop(_run(tmp_path))
  os.remove(tmp_path / train.DONE)
  for step in (5, 7):
    _corrupt(tmp_path / train.CHECKPOINTS / str(step), "truncated array")
  with pytest.raises(errors.WorkdirError,
                     match=r"None of the 2 checkpoints .* can be read"):
    train.train_loop(_run(tmp_path))
  records = train.train_loop(_run(tmp_path))  # both moved aside: from step 0
  assert [r["step"] for r in records] == [0, 2, 4, 6]


def test_a_workdir_that_is_a_file_or_has_broken_state_is_named(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(errors.WorkdirError, match=r"Cannot use .*file as a run "
                     "folder"):
    train.train_loop(_run(tmp_path / "file"))
  done_without_records = tmp_path / "empty"
  done_without_records.mkdir()
  (done_without_records / train.DONE).write_text("done\n")
  with pytest.raises(errors.WorkdirError, match="marked done but has no "
                     "records"):
    train.train_loop(_run(done_without_records))
  with pytest.raises(Crash):
    train.train_loop(_run(tmp_path / "cut", crash_at=3))
  (tmp_path / "cut" / workdir.CONFIG).write_text("")
  with pytest.raises(errors.WorkdirError, match="config.json is not valid "
                     "JSON"):
    train.train_loop(_run(tmp_path / "cut"))


def test_a_checkpoint_of_another_model_is_refused_not_moved(tmp_path):
  train.train_loop(_run(tmp_path))
  os.remove(tmp_path / train.DONE)
  other = _run(tmp_path)
  other.state = other.state.replace(params={"other": jnp.zeros(3)})
  with pytest.raises(errors.WorkdirError, match="does not fit this run"):
    train.train_loop(other)
  assert _checkpoint_steps(tmp_path) == [5, 7]  # nothing moved
  assert not os.path.exists(tmp_path / train.CORRUPT_CHECKPOINTS)


def test_step_time_is_the_update_alone_and_schedule_values_are_not_averaged(
    tmp_path):
  import time  # pylint: disable=g-import-not-at-top
  run = _run(tmp_path, steps=3, record_every=2)
  evaluate = run.evaluate
  run.evaluate = lambda p: time.sleep(0.5) or evaluate(p)
  records = train.train_loop(run)
  # The record at step 0 covers one update, not the compile or the 0.5 s
  # evaluation; DomainBed's step_time is the update alone.
  assert all(r["step_time"] < 0.25 for r in records), records
  means = train.window_means([{"loss": np.float32(1.0),
                               "penalty_weight": np.float32(0.0)},
                              {"loss": np.float32(3.0),
                               "penalty_weight": np.float32(100.0)}])
  assert means == {"loss": 2.0, "penalty_weight": 100.0}
