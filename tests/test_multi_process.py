"""A real multi-process job: two processes on this machine joined by
jax.distributed (localhost coordinator, gloo all-reduces), each loading its
part of every batch (parallel.initialize, parallel.shard_batch)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--config", os.path.join(ROOT, "configs", "domainbed.py"),
       "--config.algorithm=fishr", "--config.hparams.batch_size=8",
       "--config.hparams.penalty_anneal_iters=2", "--config.eval_batch_size=512"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(**extra):
  # Without the tests' compilation cache (conftest): with it, on a loaded
  # machine, a job's two processes once failed to meet at gloo's first
  # collective within its 30 s (one loading a program the other compiled?).
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra)
  return env


def _start(workdir, digits, *flags, process_id=None, port=None):
  """A run on `digits` (a folder of MNIST IDX files: the tests' few hundred
  digits keep each evaluation short)."""
  env = _env()
  args = [sys.executable, "-m", "fishr_jax.main", *RUN,
          "--config.digits_source=idx", f"--config.data_dir={digits}", *flags,
          "--workdir", str(workdir)]
  if process_id is not None:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
    args.append("--config.distributed=True")
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _records(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_give_the_records_of_one(tmp_path, tiny_mnist_dir):
  steps = ["--config.steps=7", "--config.checkpoint_freq=3"]
  port = _free_port()
  pair = [_start(tmp_path / "two", tiny_mnist_dir, *steps, process_id=i,
                 port=port) for i in (0, 1)]
  single = _start(tmp_path / "one", tiny_mnist_dir, *steps)
  for proc in pair + [single]:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
  one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
  assert [r["step"] for r in two] == [0, 3, 6]
  for a, b in zip(one, two):
    for key, value in a.items():
      if key == "step_time" or not isinstance(value, float):
        assert key == "step_time" or value == b[key], key
        continue
      assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (a["step"], key)
  assert os.path.exists(tmp_path / "two" / "done")
  assert not os.path.exists(tmp_path / "two" / "lock")  # released


@pytest.mark.slow
def test_a_killed_worker_stops_the_other_with_a_message(tmp_path,
                                                       tiny_mnist_dir):
  port = _free_port()
  lead, worker = [_start(tmp_path / "run", tiny_mnist_dir, "--config.steps=2000",
                         "--config.checkpoint_freq=50", process_id=i,
                         port=port) for i in (0, 1)]
  try:
    for line in lead.stdout:  # the first record: both are training
      if "step    0/2000" in line:
        break
    worker.kill()
    started = time.time()
    out, _ = lead.communicate(timeout=120)  # no hang
    assert time.time() - started < 60
  finally:
    for proc in (lead, worker):
      if proc.poll() is None:
        proc.kill()
  assert lead.returncode == 6, out[-3000:]
  assert "error: another process of this job stopped" in out
  assert "Start the whole job again to resume" in out
  assert not os.path.exists(tmp_path / "run" / "done")
