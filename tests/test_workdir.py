"""A run folder's files: atomic writes, torn lines, the lock, config changes
(fishr_jax/workdir.py)."""

import json
import os

import pytest

from fishr_jax import errors
from fishr_jax import workdir


def test_write_text_replaces_whole_files_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / "f.json")
  workdir.write_json(path, {"a": 1})
  workdir.write_text(path, "second\n")
  assert open(path).read() == "second\n"
  assert os.listdir(tmp_path) == ["f.json"]


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path, capsys):
  path = tmp_path / "r.jsonl"
  path.write_text('{"step": 0}\n\n{"step": 1}\n{"step": 2, "lo')
  assert workdir.read_jsonl(str(path)) == [{"step": 0}, {"step": 1}]
  assert "line 4 is cut short" in capsys.readouterr().err
  path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
  with pytest.raises(errors.RecordsError, match=r"r.jsonl line 2: malformed"):
    workdir.read_jsonl(str(path))


def test_lock_is_exclusive_nests_and_is_released(tmp_path):
  with workdir.lock(str(tmp_path)):
    holder = json.loads((tmp_path / workdir.LOCK).read_text())
    assert holder["pid"] == os.getpid()
    with workdir.lock(str(tmp_path)):  # the same process: shared
      assert workdir.is_locked(str(tmp_path))
    assert workdir.is_locked(str(tmp_path))
  assert not workdir.is_locked(str(tmp_path))
  assert not (tmp_path / workdir.LOCK).exists()


def test_move_aside_keeps_the_old_run(tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  (run / "results.jsonl").write_text("{}\n")
  moved = workdir.move_aside(str(run))
  assert not run.exists()
  assert open(os.path.join(moved, "results.jsonl")).read() == "{}\n"
  assert f"Moved the previous run to {moved}" in capsys.readouterr().out
  assert workdir.move_aside(str(run)) is None


def test_config_changes_lists_each_field_but_the_allowed_ones():
  old = json.dumps({"lr": 0.1, "fishr": {"ema": 0.9}, "num_devices": 1})
  new = json.dumps({"lr": 0.1, "fishr": {"ema": 0.5}, "num_devices": 4,
                    "extra": 1})
  assert workdir.config_changes(old, new, ("num_devices",)) == [
      "fishr.ema: recorded 0.9, now 0.5"]  # a field on one side only is not


# --------------------------------------------------------------- RunFolder


def _state(step):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return {"step": jnp.asarray(step, jnp.int32), "w": jnp.arange(3.0) + step,
          "rng": jax.random.key(step)}


def test_run_folder_resumes_from_its_newest_checkpoint_with_its_records(
    tmp_path, capsys):
  import jax  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "run")
  folder = workdir.RunFolder(path, '{"lr": 0.1}')
  with folder.lock():
    assert folder.finished_records() is None
    state, records = folder.resume(_state(0))  # nothing yet: the template
    assert int(state["step"]) == 0 and records == []
    for step in range(4):
      folder.append({"step": step})
      if step in (1, 2):
        folder.save(step + 1, _state(step + 1))
    folder.close()
  assert json.loads((tmp_path / "run" / workdir.CONFIG).read_text()) == {
      "lr": 0.1}
  again = workdir.RunFolder(path, '{"lr": 0.1}')
  state, records = again.resume(_state(0))
  again.close()
  assert "Resuming" in capsys.readouterr().out
  assert int(state["step"]) == 3 and state["w"].tolist() == [3.0, 4.0, 5.0]
  assert (jax.random.key_data(state["rng"]).tolist()
          == jax.random.key_data(jax.random.key(3)).tolist())
  assert records == [{"step": 0}, {"step": 1}, {"step": 2}]  # not 3
  assert workdir.read_records(path) == records  # cut on disk too
  with pytest.raises(errors.WorkdirError, match="lr: recorded 0.1, now 0.2"):
    workdir.RunFolder(path, '{"lr": 0.2}').resume(_state(0))


def test_run_folder_done_returns_its_records_and_refuses_a_new_config(
    tmp_path, capsys):
  path = str(tmp_path)
  folder = workdir.RunFolder(path, '{"lr": 0.1}')
  folder.resume(_state(0))
  folder.append({"step": 0, "loss": 1.0})
  folder.mark_done()
  assert os.path.exists(tmp_path / workdir.DONE)
  again = workdir.RunFolder(path, '{"lr": 0.1, "num_devices": 4}')
  assert again.finished_records() == [{"step": 0, "loss": 1.0}]
  assert "is done" in capsys.readouterr().out
  with pytest.raises(errors.WorkdirError, match="another config"):
    workdir.RunFolder(path, '{"lr": 0.2}').finished_records()


def test_a_save_into_a_folder_moved_meanwhile_is_undone(tmp_path):
  path, moved = tmp_path / "run", tmp_path / "moved"
  folder = workdir.RunFolder(str(path), '{"lr": 0.1}')
  folder.resume(_state(0))
  folder.append({"step": 0})
  save = folder._manager.save  # pylint: disable=protected-access

  def save_as_the_folder_moves(*args, **kwargs):
    os.rename(path, moved)  # orbax then makes run/checkpoints/ again
    return save(*args, **kwargs)

  folder._manager.save = save_as_the_folder_moves  # pylint: disable=protected-access
  with pytest.raises(errors.WorkdirGoneError, match="saving the checkpoint"):
    folder.save(1, _state(1))
  assert not path.exists()
  assert sorted(os.listdir(moved)) == [
      workdir.CHECKPOINTS, workdir.CONFIG, workdir.RECORDS]
  assert not os.listdir(moved / workdir.CHECKPOINTS)  # the save went astray


def test_a_done_run_with_records_lost_is_refused(tmp_path):
  path = str(tmp_path)
  folder = workdir.RunFolder(path, '{"lr": 0.1}')
  folder.resume(_state(0))
  for step in (0, 2, 4):
    folder.append({"step": step})
  folder.mark_done()
  assert len(folder.finished_records([0, 2, 4])) == 3
  lines = (tmp_path / workdir.RECORDS).read_text().splitlines()
  (tmp_path / workdir.RECORDS).write_text(lines[0] + "\n")  # cut
  with pytest.raises(errors.WorkdirError,
                     match=r"marked done but results.jsonl lacks 2 of its 3 "
                     r"records \(steps 2, 4; deleted or cut\?\)"):
    folder.finished_records([0, 2, 4])
