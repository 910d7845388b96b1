"""The command line's side of mistakes: flag paths that Python's syntax
refuses, unknown or ill-typed --config.X flags, and one-line messages with
exit codes in place of tracebacks.

Exit codes: 0 done; 1 an unexpected error (a bug: its traceback is in the
workdir's error.log, or printed with --verbose); 2 a bad config or flag;
3 a data file missing or broken; 4 the run diverged; 5 the workdir
disagrees with the run (or was moved away); 6 another process of a
multi-process job died; 74 no space left on device; 75 another process
owns the workdir; 130
interrupted (run the same command again to resume).
"""

import functools
import importlib.util
import keyword
import logging as std_logging
import os
import re
import sys
import traceback
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from fishr_jax import config_checks
from fishr_jax import errors
from fishr_jax import parallel
from fishr_jax import workdir as workdir_lib

ERROR_LOG = "error.log"
INTERRUPTED = 130

_OVERRIDE = re.compile(r"^--(config\.[^=\s]+)(=.*)?$", re.DOTALL)


class _PipeSafe:
  """A text stream that survives its reader going away (`fishr-jax ... |
  head -2`): the first BrokenPipeError points the file descriptor at
  /dev/null, so the run goes on and later output is dropped instead of
  ending it."""

  def __init__(self, stream: Any, name: str):
    self._stream, self._name, self.dropped = stream, name, False

  def _drop(self) -> None:
    self.dropped = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, self._stream.fileno())
    os.close(devnull)
    try:
      self._stream.flush()  # what was buffered goes to /dev/null now
    except (BrokenPipeError, ValueError):
      pass
    if self._name == "stdout":
      try:
        print("warning: standard output was closed (its reader exited); "
              "training goes on, its output dropped.", file=sys.stderr,
              flush=True)
      except (BrokenPipeError, ValueError):
        pass

  def write(self, text: str) -> int:
    try:
      return self._stream.write(text)
    except BrokenPipeError:
      self._drop()
      return len(text)

  def flush(self) -> None:
    try:
      self._stream.flush()
    except BrokenPipeError:
      self._drop()

  def __getattr__(self, name: str) -> Any:
    return getattr(self._stream, name)


def survive_closed_pipes() -> None:
  """Output to a closed pipe must not end a run: sys.stdout and sys.stderr
  drop their output once their reader has gone."""
  for name in ("stdout", "stderr"):
    stream = getattr(sys, name)
    if stream is not None and not isinstance(stream, _PipeSafe):
      try:
        stream.fileno()
      except (AttributeError, OSError, ValueError):
        continue  # not a file (captured by a test): nothing to guard
      setattr(sys, name, _PipeSafe(stream, name))


class _QuietLibraryErrors(std_logging.Filter):
  """Drops the error logs (with tracebacks) of orbax's background threads
  and of asyncio: the error they report reaches the run as an exception,
  which ends in one line (a full disk: errors.NoSpaceError)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.name == "asyncio"
                or f"{os.sep}orbax{os.sep}" in (record.pathname or ""))


_QUIET = _QuietLibraryErrors()


def _quiet_closed_loop_callbacks(unraisable: Any) -> None:
  """sys.unraisablehook without "Event loop is closed": after a checkpoint
  save fails (a full disk, the folder moved), TensorStore still calls back
  into the event loop orbax closed; the failure itself reaches the run as
  an exception."""
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError)
          and str(error) == "Event loop is closed"):
    sys.__unraisablehook__(unraisable)


def set_library_logs(verbose: bool = False) -> None:
  """Library logs (orbax's lines on every checkpoint, JAX's backend notes)
  at WARNING, without orbax's and asyncio's tracebacks; all of them (INFO)
  with `verbose`."""
  logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
  for name in ("absl", "asyncio"):
    logger = std_logging.getLogger(name)
    logger.removeFilter(_QUIET)
    if not verbose:
      logger.addFilter(_QUIET)
  sys.unraisablehook = (sys.__unraisablehook__ if verbose
                        else _quiet_closed_loop_callbacks)


def keyword_safe_argv(argv: Sequence[str]) -> list[str]:
  """--config.hparams.lambda=1 -> --config.hparams.lambda_=1: a Python
  keyword in a flag path becomes its underscored field."""
  out = []
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match:
      parts = [p + "_" if keyword.iskeyword(p) else p
               for p in match.group(1).split(".")]
      arg = "--" + ".".join(parts) + (match.group(2) or "")
    out.append(arg)
  return out


def overridden_paths(argv: Sequence[str]) -> list[str]:
  """The field paths that --config.X=... flags in `argv` set."""
  return [m.group(1)[len("config."):] for m in map(_OVERRIDE.match, argv) if m]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """What --config=PATH[:PRESET] loads, without the flag machinery."""
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def _paths(config: Any, prefix: str = "") -> list[str]:
  if not isinstance(config, ml_collections.ConfigDict):
    return [prefix[:-1]]
  return [p for k, v in config.items() for p in _paths(v, f"{prefix}{k}.")]


def unknown_override(argv: Sequence[str], config_spec: str) -> str | None:
  """A message for the first --config.X flag that names no field, if any."""
  try:
    config = load_config_file(config_spec)
  except Exception:  # pylint: disable=broad-except
    return None  # the flag's own error says what is wrong with the file
  fields = _paths(config)
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    path = match.group(1)[len("config."):]
    if path in fields or any(f.startswith(path + ".") for f in fields):
      continue
    parent, _, last = path.rpartition(".")
    # Siblings first (fishr.lamda -> fishr.lambda_), then the same name in
    # any block (lamda -> fishr.lambda_, irm.lambda_).
    siblings = [f for f in fields if f.rpartition(".")[0] == parent]
    near = [f for f in siblings
            if config_checks.suggest(last, [f.rpartition(".")[2]])]
    near = near or [f for f in fields
                    if config_checks.suggest(last, [f.rpartition(".")[2]])]
    hint = (f" Did you mean {' or '.join('config.' + f for f in near[:4])}?"
            if near else "")
    return (f"--config.{path}: {config_spec} has no field {path!r}.{hint} "
            "(python -m fishr_jax.main --config CONFIG --helpfull lists them)")
  return None


def config_with_flags(config_spec: str, overrides: Sequence[str]
                      ) -> ml_collections.ConfigDict:
  """The config that `--config=config_spec` and the --config.X=Y flags
  `overrides` give on the command line (one run of main's --runs file)."""
  argv = ["fishr_jax", "--config", config_spec,
          *keyword_safe_argv(overrides)]
  problem = unknown_override(argv, config_spec)
  if problem:
    raise errors.ConfigError(problem)
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "",
                                           flag_values=values,
                                           lock_config=True)
  saved, sys.argv = sys.argv, argv  # ml_collections reads them from sys.argv
  try:
    values(argv)
  except flags.Error as e:
    raise errors.ConfigError(f"{' '.join(overrides)}: {e}") from None
  finally:
    sys.argv = saved
  return holder.value


def config_spec(argv: Sequence[str]) -> str | None:
  """The value of --config (PATH[:PRESET]) in `argv`, if given."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
              None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  return spec


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser, with bad --config.X flags as one line and exit code 2."""
  argv = keyword_safe_argv(argv)
  sys.argv = argv  # ml_collections reads the --config.X flags from sys.argv
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    spec = config_spec(argv)
    message = unknown_override(argv, spec) if spec else None
    if message is None:
      message = str(e).strip().splitlines()[-1] or type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    sys.exit(errors.ConfigError.exit_code)


def load_config_flag(holder: Any, spec: str | None) -> Any:
  """The --config flag's value (holder.value), or one line and exit 2 when
  its file is missing or cannot be loaded (ml_collections raises an
  OSError about an 'earlier failure' at the first access)."""
  try:
    value = holder.value
    value.keys()  # a failed load returns an object that raises on use
    return value
  except Exception as e:  # pylint: disable=broad-except
    path = (spec or "").partition(":")[0]
    if path and not os.path.exists(path):
      message = (f"--config={spec}: no such file. The configs are "
                 "configs/colored_mnist.py and configs/domainbed.py "
                 "(optionally :PRESET).")
    else:
      cause = e.__cause__ or e.__context__ or e
      lines = str(cause).strip().splitlines() or [type(cause).__name__]
      message = (f"--config={spec}: cannot load it ({type(cause).__name__}: "
                 f"{lines[-1].strip()}); fix the file or pass another one.")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(errors.ConfigError.exit_code)


# What JAX says when JAX_PLATFORMS names a backend that is not installed.
_NO_BACKEND = ("Unable to initialize backend", "Unknown backend",
               "no platforms that are instances of")
_BACKEND_PACKAGES = {"gpu": "pip install -e '.[cuda13]' (or '.[cuda12]')",
                     "cuda": "pip install -e '.[cuda13]' (or '.[cuda12]')",
                     "tpu": "pip install -e '.[tpu]'",
                     "rocm": "a ROCm build of jaxlib (JAX's installation "
                             "guide)"}


def backend_problem(error: BaseException) -> str | None:
  """One line for a backend that JAX_PLATFORMS asks for but JAX cannot
  start (no plugin installed), naming what to install; None otherwise."""
  if not isinstance(error, RuntimeError) or not any(
      text in str(error) for text in _NO_BACKEND):
    return None
  platforms = os.environ.get("JAX_PLATFORMS", "")
  wanted = [p.strip() for p in platforms.split(",") if p.strip()]
  install = "; ".join(dict.fromkeys(
      _BACKEND_PACKAGES[p] for p in wanted if p in _BACKEND_PACKAGES))
  if not install:
    install = "the backend's jax plugin"
  return (f"JAX_PLATFORMS={platforms!r} asks for a backend that JAX cannot "
          f"start: no {' or '.join(wanted).upper() or 'such'} backend is "
          f"installed (JAX: {_first_sentence(error)}). Install "
          f"one with {install}, or unset JAX_PLATFORMS to use what is "
          "there (the CPU).")


def _first_sentence(error: BaseException) -> str:
  text = str(error).strip().splitlines()[0]
  return text.split(" (set JAX_PLATFORMS")[0].rstrip(".")[:200]


def run_reporting_errors(fn: Callable[[], Any], workdir: str,
                         verbose: bool) -> Any:
  """fn(), with a mistake the user can fix as one line and its exit code,
  and any other error's traceback in workdir/error.log (printed too with
  `verbose`)."""
  try:
    return fn()
  except errors.UserError as e:
    if verbose:
      raise
    print(f"error: {e}", file=sys.stderr)
    # After a failed save (a full disk), TensorStore's writes still under
    # way would print tracebacks while the interpreter shuts down; every
    # file is closed and the lock released by now, so the process ends here.
    _exit(e.exit_code, now=isinstance(e, errors.NoSpaceError))
  except KeyboardInterrupt:
    _interrupted(f"run the same command again to resume {workdir}.")
  except Exception as e:  # pylint: disable=broad-except
    if verbose:
      raise
    problem = backend_problem(e)
    if problem:
      print(f"error: {problem}", file=sys.stderr, flush=True)
      _exit(errors.ConfigError.exit_code)
    if parallel.is_peer_failure(e):
      print(f"error: another process of this job stopped "
            f"({str(e).strip().splitlines()[0][:200]}). Start the whole job "
            f"again to resume {workdir} from its last checkpoint.",
            file=sys.stderr, flush=True)
      _exit(errors.PeerProcessError.exit_code)
    full = workdir_lib.no_space_error(e, os.path.join(workdir, ERROR_LOG),
                                      "writing")
    if full is not None:
      print(f"error: {full}", file=sys.stderr, flush=True)
      _exit(full.exit_code, now=True)
    log = os.path.join(workdir, ERROR_LOG)
    try:
      # Not made if missing: a folder moved away must not come back.
      if not os.path.isdir(workdir):
        raise FileNotFoundError(workdir)
      with open(log, "a") as f:
        f.write(traceback.format_exc())
      where = f"its traceback is in {log}"
    except OSError:
      where = "rerun with --verbose for its traceback"
    print(f"error: {type(e).__name__}: {e}\n(an unexpected error: {where}; "
          "--verbose prints it)", file=sys.stderr)
    _exit(1)


def _interrupted(how_to_go_on: str) -> None:
  """Ends the process after Ctrl-C. Every finally block has run (locks
  released, checkpoints finished), but a computation that XLA's threads were
  still running when the interrupt came would crash the interpreter's
  shutdown (a segfault, exit -11), so the process ends here."""
  print(f"Interrupted; {how_to_go_on}", file=sys.stderr, flush=True)
  _exit(INTERRUPTED, now=True)


def reporting_main(main: Callable[[Sequence[str]], Any], interrupted: str
                   ) -> Callable[[Sequence[str]], Any]:
  """`main` for absl's app.run, for the experiments' commands: Ctrl-C ends
  it in one line, `Interrupted; <interrupted>` (what is kept and how to go
  on), exit 130; a mistake the user can fix in one line with its exit code.
  Any other error is a bug and keeps its traceback."""

  @functools.wraps(main)
  def reporting(argv: Sequence[str]) -> Any:
    try:
      return main(argv)
    except KeyboardInterrupt:
      _interrupted(interrupted)
    except errors.UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)

  return reporting


def _exit(code: int, now: bool = False) -> None:
  """sys.exit, except in a multi-process job (or with `now`): there JAX's
  exit handler would wait at its shutdown barrier for processes that are
  still training (or dead) and hang, so the process ends now and the
  others see it go."""
  if not now and not parallel.is_multi_process():
    sys.exit(code)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
