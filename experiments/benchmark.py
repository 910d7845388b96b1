"""Step time and peak memory of ERM vs Fishr, in one run.

  python -m experiments.benchmark --output_dir runs/benchmark

For each setting, jits the full train step of ERM, Fishr with the closed-form
head variance and Fishr with jax.vmap(jax.grad) over the head (and, where
listed, Fishr over every layer), times the median of --repeats steps after
--warmup steps (interleaving the algorithms round by round so machine noise
hits all of them alike), reads the compiled step's memory from XLA's memory
analysis, and writes benchmark.md and benchmark.json with Fishr/ERM ratios.
Runs on whatever backend JAX finds.

Settings:
  colored_mnist_full_batch  MLP 392-390-390-1 on 2 x 25,000 random inputs
                            (the full-MNIST Colored MNIST batch); also Fishr
                            over all layers by the Dense closed form.
  domainbed_mnist_cnn       DomainBed's MNIST_CNN, 3 domains x 64 (or
                            --mnist_cnn_per_domain), 10 classes.
  domainbed_mnist_cnn_all   the same, every registered algorithm (not run
                            by default), penalties on from step 0.
  resnet50_pacs             ResNet-50 (frozen BN), 3 x 32, head C = 7.
  resnet50_domainnet        ResNet-50 (frozen BN), 3 x 32, head C = 345.
  weak_scaling              MNIST_CNN, 3 x 64 (--mnist_cnn_per_domain)
                            examples PER DEVICE, ERM and
                            Fishr on 1, 2, 4, ... of the devices found;
                            efficiency = time on 1 / time on n.
  whole_run                 a whole DomainBed ColoredMNIST run (ERM and
                            Fishr, test env 2, --whole_run_steps steps, an
                            evaluation of all six splits every
                            --whole_run_every), wall time of the command:
                            start-up, data, compile and evaluations
                            included; the official DomainBed code's too, on
                            the same machine and digits, with
                            --official_domainbed. Needs full MNIST
                            (--whole_run_data_dir: the four IDX files).
                            Not in the default list.
  runs_per_program          Fishr's step for K = 1, 4, 10, 20 runs as one
                            vectorized program (vectorized.py), for the
                            default Colored MNIST run (embedded digits) and
                            MNIST_CNN; throughput = K x (one run's step
                            time) / (the K-run step's time).
Pass setting names as arguments to run only those. The ResNet rows use
--image_size (DomainBed: 224) and random weights (timing does not depend on
them).
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from configs import colored_mnist as cmnist_config
from fishr_jax import algorithms
from fishr_jax import cli
from fishr_jax import errors
from fishr_jax import hparams as hparams_lib
from fishr_jax import models
from fishr_jax import parallel
from fishr_jax import steps
from fishr_jax import train
from fishr_jax.algorithms import settings

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/benchmark", "Output folder.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed steps per algorithm.",
                                lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.",
                               lower_bound=0)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224,
                                   "Image side of the ResNet-50 rows.",
                                   lower_bound=32)
_MNIST_CNN_PER_DOMAIN = flags.DEFINE_integer(
    "mnist_cnn_per_domain", 64, "Examples per domain of the MNIST_CNN rows "
    "(weak_scaling: per device; runs_per_program's MNIST_CNN too).",
    lower_bound=1)
_COMPUTE_DTYPE = flags.DEFINE_enum(
    "compute_dtype", "float32", list(models.COMPUTE_DTYPES),
    "The networks' compute dtype (Fishr's moments stay float32).")
_ALGORITHMS = flags.DEFINE_list(
    "algorithms", None,
    "domainbed_mnist_cnn_all: only these algorithms (and ERM, the baseline); "
    "default every registered one.")
_XLA_CPU_DOT_FUSION = flags.DEFINE_bool(
    "xla_cpu_dot_fusion", True,
    "On CPU, compile the steps with YNNPACK's dot fusion "
    "(config.xla_cpu_dot_fusion).")

_WHOLE_RUN_DATA_DIR = flags.DEFINE_string(
    "whole_run_data_dir", "", "whole_run: the folder of MNIST's four IDX "
    "files (both sides read the same digits).")
_WHOLE_RUN_STEPS = flags.DEFINE_integer("whole_run_steps", 2001,
                                        "whole_run: steps per run.",
                                        lower_bound=1)
_WHOLE_RUN_EVERY = flags.DEFINE_integer(
    "whole_run_every", 500, "whole_run: steps between evaluations.",
    lower_bound=1)
_OFFICIAL_DOMAINBED = flags.DEFINE_string(
    "official_domainbed", "", "whole_run: a checkout of "
    "facebookresearch/DomainBed to time as well (empty: ours only).")
_OFFICIAL_PYTHON = flags.DEFINE_string(
    "official_python", "python3", "whole_run: the Python (with PyTorch) "
    "that runs the official code.")

VARIANTS = {
    "erm": ("erm", {}),
    "fishr_closed_form": ("fishr", {"grad_path": "closed_form"}),
    "fishr_vmap": ("fishr", {"grad_path": "vmap"}),
    "fishr_all_layers_closed_form": ("fishr", {"grad_path": "closed_form",
                                               "params": "all"}),
}
HEAD_VARIANTS = ("erm", "fishr_closed_form", "fishr_vmap")


def _variant(variant: str) -> tuple[str, dict]:
  """(algorithm, Fishr options) of a variant; any other registered
  algorithm is a variant of its own name."""
  return VARIANTS.get(variant, (variant, {}))


def _random_batch(shape: tuple[int, ...], num_domains: int, n_per_domain: int,
                  num_classes: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  n = n_per_domain * num_domains
  y = (rng.integers(0, 2, n).astype(np.float32) if num_classes == 1
       else rng.integers(0, num_classes, n).astype(np.int32))
  return {"x": rng.random((n,) + shape, np.float32), "y": y,
          "domain": np.repeat(np.arange(num_domains, dtype=np.int32),
                              n_per_domain)}


def _dtype():
  return models.compute_dtype(_COMPUTE_DTYPE.value)


def _colored_mnist_algorithm(name: str, fishr_options: dict):
  """(algorithm config, schedule, lr) from the paper's Colored MNIST config,
  the penalty on from step 0."""
  config = cmnist_config.get_config("paper")
  config.algorithm = name
  config.penalty_anneal_iters = 0  # time the step with the penalty on
  config.fishr.update(fishr_options)
  return (*settings.from_config_dict(config), config.lr)


def _domainbed_algorithm(dataset: str):
  """The same from DomainBed's default hparams on `dataset`."""
  def build(name: str, fishr_options: dict):
    values = hparams_lib.default_hparams(name, dataset)
    for hparam in values:  # time the step with the penalty on
      if hparam.endswith("penalty_anneal_iters"):
        values[hparam] = 0
    options = {"moment_sums": "auto", **fishr_options} if name == "fishr" else {}
    return (*settings.from_domainbed(name, values, options), values["lr"])
  return build


def colored_mnist_full_batch(n_per_domain: int = 25000,
                             hidden: int = 390) -> dict[str, Any]:
  return {"model": models.MLP(hidden_dims=(hidden, hidden), num_outputs=1,
                               dtype=_dtype()),
          "batch": _random_batch((14, 14, 2), 2, n_per_domain, 1),
          "num_domains": 2, "algorithm": _colored_mnist_algorithm,
          "variants": HEAD_VARIANTS + ("fishr_all_layers_closed_form",),
          "description": f"Colored MNIST full batch, 2 x {n_per_domain:,}, "
                         f"MLP {hidden}"}


def domainbed_mnist_cnn(n_per_domain: int | None = None) -> dict[str, Any]:
  """MNIST_CNN on 3 domains x `n_per_domain` (None: --mnist_cnn_per_domain)."""
  n_per_domain = n_per_domain or _MNIST_CNN_PER_DOMAIN.value
  return {"model": models.MNISTCNN(num_outputs=10, dtype=_dtype()),
          "batch": _random_batch((28, 28, 1), 3, n_per_domain, 10),
          "num_domains": 3, "algorithm": _domainbed_algorithm("ColoredMNIST"),
          "description": f"DomainBed MNIST_CNN, 3 x {n_per_domain}, 10 classes"}


def resnet_head(num_classes: int, dataset: str, depth: int = 50,
                n_per_domain: int = 32) -> dict[str, Any]:
  from fishr_jax import resnet  # pylint: disable=g-import-not-at-top
  size = _IMAGE_SIZE.value
  return {"model": resnet.ResNet(depth=depth, num_classes=num_classes,
                                 dtype=_dtype()),
          "stochastic": True,
          "batch": _random_batch((size, size, 3), 3, n_per_domain,
                                 num_classes),
          "num_domains": 3, "algorithm": _domainbed_algorithm("PACS"),
          "description": f"ResNet-{depth} {dataset} head (C = {num_classes}), "
                         f"3 x {n_per_domain}, {size} px"}


def domainbed_mnist_cnn_all() -> dict[str, Any]:
  """domainbed_mnist_cnn, every registered algorithm (Fishr's closed form)."""
  setting = domainbed_mnist_cnn()
  names = _ALGORITHMS.value or algorithms.names()
  unknown = sorted(set(names) - set(algorithms.names()))
  if unknown:
    raise errors.ConfigError(f"--algorithms: unknown {unknown}; the "
                             f"algorithms are {algorithms.names()}.")
  setting["variants"] = tuple(
      "fishr_closed_form" if name == "fishr" else name
      for name in ["erm"] + [n for n in names if n != "erm"])
  setting["description"] += (", every algorithm" if _ALGORITHMS.value is None
                             else ", " + ", ".join(setting["variants"]))
  return setting


SETTINGS: dict[str, Callable[[], dict[str, Any]]] = {
    "colored_mnist_full_batch": colored_mnist_full_batch,
    "domainbed_mnist_cnn": lambda: domainbed_mnist_cnn(),
    "domainbed_mnist_cnn_all": domainbed_mnist_cnn_all,
    "resnet50_pacs": lambda: resnet_head(7, "PACS"),
    "resnet50_domainnet": lambda: resnet_head(345, "DomainNet"),
}


def _factory(name: str, network: algorithms.Network, num_domains: int
             ) -> train.AlgorithmFactory:
  return lambda spec, mesh: algorithms.make_algorithm(
      name, network, num_domains, spec.algorithm, spec.schedule, mesh)


def compile_step(setting: dict[str, Any], variant: str, mesh=None):
  """The jitted step of one variant (sharded over `mesh`; None: one device),
  its start state and batch, its peak memory (bytes) and its floating-point
  operations (XLA's cost analysis; None where the backend gives none)."""
  name, fishr_options = _variant(variant)
  alg_config, schedule, lr = setting["algorithm"](name, fishr_options)
  model = setting["model"]
  variables = dict(models.init_variables(
      model, jax.random.key(1),
      algorithms.network_input(name, setting["batch"]["x"][:1])))
  params = variables.pop("params")
  network = algorithms.Network.from_module(
      model, frozen=variables, stochastic=setting.get("stochastic", False))
  # One device is a mesh of one: the batch keeps its order there.
  built = steps.build(_factory(name, network, setting["num_domains"]),
                      train.StepSpec(alg_config, schedule, lr),
                      mesh or parallel.make_mesh(1), setting["num_domains"],
                      xla_cpu_dot_fusion=_XLA_CPU_DOT_FUSION.value)
  batch = built.shard(setting["batch"])
  state = built.init_state(jax.random.key(0), params, batch)
  step = built.step
  compiled = step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  peak = None
  if memory is not None:
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  cost = compiled.cost_analysis() or {}
  return compiled, state, batch, peak, cost.get("flops")


def time_steps(runs: dict[str, tuple]) -> dict[str, float]:
  """Median step time of each compiled run, interleaved round by round."""
  states = {v: run[1] for v, run in runs.items()}
  for v, run in runs.items():
    for _ in range(_WARMUP.value):
      states[v], _ = run[0](states[v], run[2])
    jax.block_until_ready(states[v])
  times = {v: [] for v in runs}
  for _ in range(_REPEATS.value):
    for v, run in runs.items():
      start = time.perf_counter()
      states[v], metrics = run[0](states[v], run[2])
      jax.block_until_ready((states[v], metrics))
      times[v].append(time.perf_counter() - start)
  return {v: float(np.median(t)) for v, t in times.items()}


def benchmark_setting(setting: dict[str, Any]) -> dict[str, Any]:
  variants = setting.get("variants", HEAD_VARIANTS)
  runs = {v: compile_step(setting, v) for v in variants}
  times = time_steps(runs)
  out = {v: {"step_time_s": times[v], "peak_memory_bytes": runs[v][3],
             "flops": runs[v][4]} for v in variants}
  erm = out["erm"]
  for v in variants:
    out[v]["time_ratio_vs_erm"] = out[v]["step_time_s"] / erm["step_time_s"]
    for key, ratio in (("peak_memory_bytes", "memory_ratio_vs_erm"),
                       ("flops", "flops_ratio_vs_erm")):
      if out[v][key] and erm[key]:
        out[v][ratio] = out[v][key] / erm[key]
  return out


def weak_scaling() -> dict[str, Any]:
  """ERM and Fishr (closed form) on 1, 2, 4, ... devices, 3 x 64 (or
  --mnist_cnn_per_domain) per device."""
  counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= jax.device_count()]
  out = {}
  for n in counts:
    setting = domainbed_mnist_cnn(_MNIST_CNN_PER_DOMAIN.value * n)
    mesh = parallel.make_mesh(n)
    runs = {v: compile_step(setting, v, mesh)
            for v in ("erm", "fishr_closed_form")}
    for v, t in time_steps(runs).items():
      out[f"{v}@{n}"] = {"devices": n, "step_time_s": t,
                         "peak_memory_bytes": runs[v][3]}
  for key, row in out.items():
    base = out[key.split("@")[0] + "@1"]["step_time_s"]
    row["efficiency"] = base / row["step_time_s"]
  return out


RUNS_PER_PROGRAM = (1, 4, 10, 20)


def _embedded_colored_mnist() -> dict[str, Any]:
  """The default run's setting: the embedded digits' full batch, MLP 128."""
  from fishr_jax.data import colored_mnist  # pylint: disable=g-import-not-at-top
  from fishr_jax.data import mnist  # pylint: disable=g-import-not-at-top
  config = cmnist_config.get_config()
  envs = colored_mnist.make_environments(
      mnist.load_digit_pools("embedded"), config.data,
      np.random.default_rng([0, 0]))
  n = len(envs.train["y"]) // 2
  return {"model": models.MLP(hidden_dims=(config.hidden_dim,) * 2,
                               num_outputs=1, dtype=_dtype()),
          "batch": envs.train, "num_domains": 2,
          "algorithm": _colored_mnist_algorithm,
          "description": f"embedded Colored MNIST, 2 x {n:,}, MLP "
                         f"{config.hidden_dim}"}


def compile_vectorized_step(setting: dict[str, Any], variant: str,
                            num_runs: int):
  """`num_runs` runs of one variant as one vectorized program (each its own
  initialization and learning rate), its stacked state and batch."""
  from fishr_jax import vectorized  # pylint: disable=g-import-not-at-top
  name, fishr_options = _variant(variant)
  alg_config, schedule, lr = setting["algorithm"](name, fishr_options)
  model = setting["model"]
  mesh = parallel.make_runs_mesh(num_runs, 1)
  specs, states = [], []
  for run in range(num_runs):
    variables = dict(models.init_variables(
        model, jax.random.key(run),
        algorithms.network_input(name, setting["batch"]["x"][:1])))
    params = variables.pop("params")
    network = algorithms.Network.from_module(
        model, frozen=variables, stochastic=setting.get("stochastic", False))
    specs.append(train.StepSpec(alg_config, schedule, lr * (1 + 0.1 * run)))
    built = steps.build(_factory(name, network, setting["num_domains"]),
                        specs[-1], mesh, setting["num_domains"], runs=True,
                        xla_cpu_dot_fusion=_XLA_CPU_DOT_FUSION.value)
    states.append(built.init_state(jax.random.key(run), params,
                                   setting["batch"]))
  shared, varying = vectorized.split_hparams(specs)
  built = steps.build(_factory(name, network, setting["num_domains"]), shared,
                      mesh, setting["num_domains"], runs=True,
                      xla_cpu_dot_fusion=_XLA_CPU_DOT_FUSION.value)
  step = built.step
  batch = built.shard([setting["batch"]] * num_runs)
  values = jax.device_put(varying, parallel.run_sharding(mesh))
  state = vectorized.stack(states, mesh)
  compiled = step.lower(state, batch, values).compile()
  return (lambda st, b: compiled(st, b, values)), state, batch


def runs_per_program(variant: str = "fishr_closed_form",
                     counts: Sequence[int] = RUNS_PER_PROGRAM,
                     setups: dict[str, dict[str, Any]] | None = None
                     ) -> dict[str, Any]:
  """Step time of K runs as one program (K = 1: one run's own step) and
  the throughput against K runs one after another, for `setups` (None:
  the default Colored MNIST run and DomainBed's MNIST_CNN)."""
  if setups is None:
    setups = {"colored_mnist_embedded": _embedded_colored_mnist(),
                 "domainbed_mnist_cnn": domainbed_mnist_cnn()}
  out = {}
  for name, setting in setups.items():
    for k in counts:
      run = (compile_step(setting, variant)[:3] if k == 1 else
             compile_vectorized_step(setting, variant, k))
      out[f"{name}@{k}"] = {"setting": setting["description"], "runs": k,
                            "step_time_s": time_steps({"k": run})["k"]}
    one = out[f"{name}@1"]["step_time_s"]
    for k in counts:
      row = out[f"{name}@{k}"]
      row["run_steps_per_s"] = k / row["step_time_s"]
      row["throughput_vs_one_by_one"] = k * one / row["step_time_s"]
  return out


def device_description() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  return f"{device.platform.upper()} {device.device_kind} x{jax.device_count()}"


def _mib(num_bytes: int | None) -> str:
  return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def whole_run() -> dict[str, Any]:
  """Wall time of whole DomainBed ColoredMNIST runs, ours and (with
  --official_domainbed) the official code's, one after the other."""
  if not _WHOLE_RUN_DATA_DIR.value:
    raise app.UsageError("whole_run needs --whole_run_data_dir (MNIST's IDX "
                         "files).")
  steps, every = _WHOLE_RUN_STEPS.value, _WHOLE_RUN_EVERY.value
  data_dir = os.path.abspath(_WHOLE_RUN_DATA_DIR.value)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = {}
  for algorithm, official_name in (("erm", "ERM"), ("fishr", "Fishr")):
    commands = {"ours": ([sys.executable, "-m", "fishr_jax.main", "--config",
                          "configs/domainbed.py",
                          "--config.dataset=ColoredMNIST",
                          f"--config.algorithm={algorithm}",
                          "--config.test_envs=2", f"--config.steps={steps}",
                          f"--config.checkpoint_freq={every}",
                          "--config.digits_source=idx",
                          f"--config.data_dir={data_dir}", "--workdir"], root)}
    if _OFFICIAL_DOMAINBED.value:
      commands["official"] = (
          [_OFFICIAL_PYTHON.value, "-m", "domainbed.scripts.train",
           "--dataset", "ColoredMNIST", "--algorithm", official_name,
           "--test_envs", "2", "--steps", str(steps), "--checkpoint_freq",
           str(every), "--data_dir", data_dir, "--output_dir"],
          _OFFICIAL_DOMAINBED.value)
    for side, (command, cwd) in commands.items():
      with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        subprocess.run(command + [workdir], cwd=cwd, check=True,
                       stdout=subprocess.DEVNULL)
        out[f"{algorithm}@{side}"] = {"wall_s": time.perf_counter() - start,
                                      "steps": steps, "every": every}
  for algorithm in ("erm", "fishr"):
    if f"{algorithm}@official" in out:
      out[f"{algorithm}@ours"]["vs_official"] = (
          out[f"{algorithm}@ours"]["wall_s"]
          / out[f"{algorithm}@official"]["wall_s"])
  return out


def markdown(results: dict[str, Any], device: str) -> str:
  xla_flags = os.environ.get("XLA_FLAGS", "")
  lines = [f"Device: {device}. Compute dtype {_COMPUTE_DTYPE.value}. "
           f"XLA_FLAGS: {xla_flags or '(none)'}. xla_cpu_dot_fusion: "
           f"{_XLA_CPU_DOT_FUSION.value}. ResNet images "
           f"{_IMAGE_SIZE.value} px. Median of {_REPEATS.value} steps after "
           "warm-up; memory and FLOPs from XLA's memory and cost analyses of "
           "the compiled step.",
           "",
           "| setting | algorithm | step time (ms) | vs ERM | peak memory (MiB) "
           "| vs ERM | GFLOP per step | vs ERM |",
           "|---|---|---|---|---|---|---|---|"]
  nan = float("nan")
  for setting, rows in results.items():
    if setting in ("weak_scaling", "runs_per_program", "whole_run"):
      continue
    for variant, r in rows.items():
      gflop = "n/a" if r["flops"] is None else f"{r['flops'] / 1e9:.2f}"
      lines.append(
          f"| {setting} | {variant} | {1e3 * r['step_time_s']:.1f} | "
          f"{r['time_ratio_vs_erm']:.3f} | {_mib(r['peak_memory_bytes'])} | "
          f"{r.get('memory_ratio_vs_erm', nan):.3f} | {gflop} | "
          f"{r.get('flops_ratio_vs_erm', nan):.3f} |")
  if "weak_scaling" in results:
    lines += ["", f"Weak scaling, MNIST_CNN, 3 x {_MNIST_CNN_PER_DOMAIN.value}"
              " examples per device "
              "(efficiency: time on 1 device / time on n):", "",
              "| algorithm | devices | step time (ms) | efficiency | "
              "peak memory per device (MiB) |", "|---|---|---|---|---|"]
    for key, r in results["weak_scaling"].items():
      lines.append(f"| {key.split('@')[0]} | {r['devices']} | "
                   f"{1e3 * r['step_time_s']:.1f} | {r['efficiency']:.3f} | "
                   f"{_mib(r['peak_memory_bytes'])} |")
  if "runs_per_program" in results:
    lines += ["", "Runs per program (Fishr, closed form): K runs as one "
              "vectorized step against one run's own step K times:", "",
              "| setting | runs K | step time (ms) | run-steps per s | "
              "throughput vs one by one |", "|---|---|---|---|---|"]
    for r in results["runs_per_program"].values():
      lines.append(f"| {r['setting']} | {r['runs']} | "
                   f"{1e3 * r['step_time_s']:.1f} | {r['run_steps_per_s']:.1f}"
                   f" | {r['throughput_vs_one_by_one']:.2f}x |")
  if "whole_run" in results:
    lines += ["", "Whole DomainBed ColoredMNIST runs (test env 2), wall time "
              "of the command, start-up, compile and evaluations included:",
              "", "| algorithm | code | steps | evaluation every | wall (s) | "
              "vs official |", "|---|---|---|---|---|---|"]
    for key, r in results["whole_run"].items():
      ratio = f"{r['vs_official']:.2f}x" if "vs_official" in r else ""
      lines.append(f"| {key.split('@')[0]} | {key.split('@')[1]} | "
                   f"{r['steps']} | {r['every']} | {r['wall_s']:.1f} | "
                   f"{ratio} |")
  return "\n".join(lines) + "\n"


def report(results: dict[str, Any]) -> dict[str, Any]:
  """What benchmark.json holds: the machine, the settings, the results."""
  return {"device": device_description(), "jax": jax.__version__,
          "image_size": _IMAGE_SIZE.value,
          "compute_dtype": _COMPUTE_DTYPE.value,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "xla_cpu_dot_fusion": _XLA_CPU_DOT_FUSION.value,
          "results": results}


def main(argv: Sequence[str]) -> None:
  cli.set_library_logs()
  extra = ["weak_scaling", "runs_per_program", "whole_run"]
  default = [n for n in SETTINGS if n != "domainbed_mnist_cnn_all"]
  names = argv[1:] or default + extra[:2]
  unknown = sorted(set(names) - set(SETTINGS) - set(extra))
  if unknown:
    raise app.UsageError(f"Unknown settings {unknown}; known: "
                         f"{sorted(SETTINGS) + extra}.")
  results = {}
  for name in names:
    if name == "runs_per_program":
      print("benchmarking runs per program ...", flush=True)
      results[name] = runs_per_program()
      continue
    if name == "whole_run":
      print("timing whole DomainBed runs ...", flush=True)
      results[name] = whole_run()
      continue
    if name == "weak_scaling":
      print(f"benchmarking weak scaling on {jax.device_count()} devices ...",
            flush=True)
      results[name] = weak_scaling()
      continue
    setting = SETTINGS[name]()
    print(f"benchmarking {setting['description']} ...", flush=True)
    results[name] = benchmark_setting(setting)
  device = device_description()
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  table = markdown(results, device)
  with open(os.path.join(_OUTPUT_DIR.value, "benchmark.md"), "w") as f:
    f.write(table)
  with open(os.path.join(_OUTPUT_DIR.value, "benchmark.json"), "w") as f:
    json.dump(report(results), f, indent=2)
  print(table)


if __name__ == "__main__":
  app.run(cli.reporting_main(main, "nothing was written (the tables come at "
                                   "the end); run the same command again."),
          flags_parser=cli.parse_flags)
