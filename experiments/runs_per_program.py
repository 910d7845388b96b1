"""Runs per hour of the default Colored MNIST run, end to end: K restarts in
one process (a vectorized.Group: one vectorized program, or each run's step in
turn; --group_steps), against K separate processes of one restart each
(what a sweep launcher does), one after another.

  python -m experiments.runs_per_program --output_dir results/runs_per_program

Each process is `python -m fishr_jax.main --config configs/colored_mnist.py`
(embedded digits, 301 steps) in a fresh workdir; its wall time includes
start-up, data, compiling and evaluation. Writes runs_per_program.md and
.json (--output_dir: the benchmark's flag). Per-step times of the programs alone: experiments/benchmark.py
runs_per_program.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags

from experiments import benchmark
from fishr_jax import cli

_COUNTS = flags.DEFINE_list("counts", ["1", "4", "10", "20"], "Values of K.")
_GROUP_STEPS = flags.DEFINE_list(
    "group_steps", ["auto"], "config.group_step values to time the one "
    "process with (auto: each on CPU, vmap elsewhere).")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wall_time(workdir: str, *overrides: str) -> float:
  """Seconds one training process takes, start to exit."""
  command = [sys.executable, "-m", "fishr_jax.main", "--config",
             os.path.join(ROOT, "configs", "colored_mnist.py"), "--workdir",
             workdir, *overrides]
  start = time.perf_counter()
  subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
  return time.perf_counter() - start


def measure(counts: Sequence[int], group_steps: Sequence[str], scratch: str
            ) -> list[dict[str, Any]]:
  rows = []
  for k in counts:
    separate = sum(wall_time(os.path.join(scratch, f"separate_{k}_{r}"),
                             "--config.restarts=1", f"--config.seed={r}")
                   for r in range(k))
    for group_step in group_steps:
      together = wall_time(
          os.path.join(scratch, f"together_{k}_{group_step}"),
          f"--config.restarts={k}", "--config.runs_per_program=0",
          f"--config.group_step={group_step}")
      rows.append({"runs": k, "group_step": group_step,
                   "one_process_s": together, "separate_processes_s": separate,
                   "runs_per_hour_one_process": 3600 * k / together,
                   "runs_per_hour_separate": 3600 * k / separate,
                   "speedup": separate / together})
      print(rows[-1], flush=True)
  return rows


def markdown(rows: list[dict[str, Any]], device: str) -> str:
  lines = [f"Device: {device}. Default Colored MNIST run (embedded digits, "
           "Fishr, 301 steps), wall time of whole processes: K restarts in "
           "one process (runs_per_program=0) against K processes of one "
           "restart, one after another.", "",
           "| runs K | group_step | one process (s) | K processes (s) | "
           "runs/hour, one process | runs/hour, K processes | speed-up |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['runs']} | {r['group_step']} | "
                 f"{r['one_process_s']:.1f} | "
                 f"{r['separate_processes_s']:.1f} | "
                 f"{r['runs_per_hour_one_process']:.0f} | "
                 f"{r['runs_per_hour_separate']:.0f} | {r['speedup']:.2f}x |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  cli.set_library_logs()
  del argv
  with tempfile.TemporaryDirectory() as scratch:
    rows = measure([int(k) for k in _COUNTS.value], _GROUP_STEPS.value,
                   scratch)
  device = benchmark.device_description()
  output_dir = benchmark._OUTPUT_DIR.value  # pylint: disable=protected-access
  os.makedirs(output_dir, exist_ok=True)
  table = markdown(rows, device)
  with open(os.path.join(output_dir, "runs_per_program.md"), "w") as f:
    f.write(table)
  with open(os.path.join(output_dir, "runs_per_program.json"), "w") as f:
    json.dump({"device": device, "rows": rows}, f, indent=2)
  print(table)


if __name__ == "__main__":
  app.run(cli.reporting_main(main, "nothing was written (the table comes at "
                                   "the end); run the same command again."),
          flags_parser=cli.parse_flags)
