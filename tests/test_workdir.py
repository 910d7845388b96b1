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
