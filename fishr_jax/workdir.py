"""A run folder, and its files written so that a killed process or a second
one never corrupts them.

- `RunFolder`: everything a run folder is, for the train loop: the lock, the
  recorded config and the resume check, the newest readable checkpoint,
  records appended one at a time, checkpoint saves, `done`; only the
  primary process of a multi-process job writes.

- `write_text`: write to a temporary name, then rename (readers see the old
  file or the new one, never half of one).
- `read_jsonl`: the records of a results.jsonl; a torn last line (a writer
  killed mid-line, by a tool that appends) is dropped with a warning.
- `lock`: the folder belongs to one process. The lock file holds the
  owner's pid and host; ownership is an flock on it, which the kernel drops
  when the owner dies, so a stale lock is taken over (with a message) and a
  live one is refused (errors.WorkdirBusyError).
- `config_changes`: what differs between the config a folder was made with
  and the one now asked for (a resume must not mix two configs).
- `move_aside`: a finished or refused run folder renamed out of the way.
"""

import contextlib
import datetime
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import sys
import time
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp

from fishr_jax import config_fields
from fishr_jax import errors
from fishr_jax import parallel

LOCK = "lock"
CONFIG = "config.json"
RECORDS = "results.jsonl"
DONE = "done"
CHECKPOINTS = "checkpoints"
CORRUPT_CHECKPOINTS = "corrupt_checkpoints"

# Config fields a resume may change: where and how fast the step runs, not
# what it computes.
MAY_CHANGE_ON_RESUME = ("num_devices", "distributed", "worker_count",
                        "eval_batch_size", "xla_cpu_dot_fusion", "group_step",
                        "diagnostics_every", "diagnostics_layers",
                        "diagnostics_examples")

PyTree = Any
Record = dict[str, Any]

# How long lock() waits for a flock held for a moment (is_locked's probe).
_BUSY_RETRY_S = 2.0
# Locks this process holds: workdir -> (file descriptor, depth). flock is per
# open file, so a nested lock() of the same folder must reuse the first.
_HELD: dict[str, list] = {}


def write_text(path: str, text: str) -> None:
  """Replaces `path` by `text` atomically (temporary file, fsync, rename);
  a failed write leaves no temporary file, and a full disk is
  errors.NoSpaceError."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise no_space_error(e, path, f"writing {os.path.basename(path)}") or e


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or one it came from) says the disk is full: an
  OSError ENOSPC, or orbax's / TensorStore's words for it."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if ("No space left on device" in str(error)
        or "os_error_code='28'" in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if n < 1024 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} B"


def no_space_error(error: BaseException, path: str, what: str,
                   resume: str = "") -> "errors.NoSpaceError | None":
  """errors.NoSpaceError naming `path` and the space left there, if
  `error` says the disk is full; None otherwise."""
  if not is_disk_full(error):
    return None
  try:
    free = _size(shutil.disk_usage(_existing(path)).free)
  except OSError:
    free = "unknown"
  return errors.NoSpaceError(
      f"no space left on device: {what} failed in {os.path.dirname(path)} "
      f"({free} free there). Free some space, or choose a --workdir on "
      f"another disk, and run the same command again{resume}.")


def write_json(path: str, value: Any) -> None:
  write_text(path, json.dumps(value, indent=2) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """One JSON object per line. A last line that does not parse and has no
  newline (cut short) is dropped with a warning; any other bad line raises
  errors.RecordsError naming the file and line."""
  with open(path) as f:
    lines = f.read().split("\n")
  records = []
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if lineno == len(lines):  # no newline after it: a torn write
        print(f"warning: {path} line {lineno} is cut short (a process died "
              "while writing it); dropped it.", file=sys.stderr, flush=True)
        continue
      raise errors.RecordsError(
          f"{path} line {lineno}: malformed JSON ({e.msg}, column "
          f"{e.colno}); fix or delete that line.") from e
  return records


# --------------------------------------------------------------------- lock


def _holder(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.loads(f.read() or "{}")
  except (OSError, json.JSONDecodeError):
    return {}


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return "a process"
  return (f"pid {holder.get('pid')} on {holder.get('host')} (since "
          f"{holder.get('since')})")


def _try_flock(fd: int) -> bool:
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False


def is_locked(workdir: str) -> bool:
  """Whether a live process holds `workdir`'s lock (this one included)."""
  path = os.path.join(workdir, LOCK)
  if os.path.abspath(workdir) in _HELD:
    return True
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return False
  try:
    if _try_flock(fd):
      fcntl.flock(fd, fcntl.LOCK_UN)
      return False
    return True
  finally:
    os.close(fd)


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds `workdir` for this process; errors.WorkdirBusyError if a live
  process holds it. Nested calls for one folder share the lock."""
  key = os.path.abspath(workdir)
  if key in _HELD:
    _HELD[key][1] += 1
    try:
      yield
    finally:
      _HELD[key][1] -= 1
    return
  path = os.path.join(workdir, LOCK)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise errors.WorkdirError(
        f"Cannot use {workdir} as a run folder ({type(e).__name__}: "
        f"{e.strerror or e}); choose a --workdir you can write to.") from e
  deadline = time.time() + _BUSY_RETRY_S
  while True:
    if not _try_flock(fd):
      if time.time() < deadline:  # e.g. a sweep's is_locked() probe
        time.sleep(0.05)
        continue
      os.close(fd)
      raise errors.WorkdirBusyError(
          f"{workdir} is in use by {_describe(_holder(path))}. Wait for it "
          "to finish, or stop it; two processes in one folder would write "
          "each record twice.")
    try:
      same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same_file = False
    if same_file:
      break
    os.close(fd)  # the holder removed it while we opened it: try again
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  previous = _holder(path)
  if previous.get("pid") not in (None, os.getpid()):
    print(f"{workdir}: taking over the lock of {_describe(previous)}, which "
          "is no longer running.", flush=True)
  holder = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}
  os.ftruncate(fd, 0)
  os.write(fd, (json.dumps(holder) + "\n").encode())
  _HELD[key] = [fd, 1]
  try:
    yield
  finally:
    del _HELD[key]
    with contextlib.suppress(FileNotFoundError):
      # Ours still (the folder may have been moved or deleted meanwhile, and
      # a new run may hold a new lock file at this path): remove it under
      # the flock, so no one else holds it.
      if os.stat(path).st_ino == os.fstat(fd).st_ino:
        os.remove(path)
    os.close(fd)


def primary_lock(workdir: str) -> contextlib.AbstractContextManager:
  """`workdir`'s lock, held by the process that writes the folder's files:
  process 0 of a multi-process job (the others write nothing but their
  part of a checkpoint); a no-op elsewhere."""
  if parallel.is_primary():
    return lock(workdir)
  return contextlib.nullcontext()


# --------------------------------------------------------- config changes


def config_changes(recorded_json: str, config_json: str,
                   may_change: tuple[str, ...] = (),
                   defaults: dict[str, tuple[Any, ...]] | None = None
                   ) -> list[str]:
  """'field: recorded X, now Y' for each field both configs have that
  differs, except those in `may_change` (settings that do not change the
  results).

  A field the recorded config lacks was added since the run was made, so
  the run ran as its default did: with `defaults` ({field: the values that
  mean its default}, config_fields.absent_field_defaults), a value now
  other than those is a change, and so is any value of a field whose
  default is not known. Without `defaults`, such fields are not compared.
  A field only the recorded config has (dropped since) is not a change."""
  old = config_fields.flatten(json.loads(recorded_json))
  new = config_fields.flatten(json.loads(config_json))
  changes = []
  for field in sorted(new):
    if field.split(".")[-1] in may_change:
      continue
    if field in old:
      if old[field] != new[field]:
        changes.append(
            f"{field}: recorded {old[field]!r}, now {new[field]!r}")
    elif defaults is not None:
      if field not in defaults:
        changes.append(f"{field}: not recorded (the run was made before it "
                       f"existed, as it was then), now {new[field]!r}")
      elif new[field] not in defaults[field]:
        changes.append(f"{field}: not recorded (the run was made before it "
                       f"existed, so with {defaults[field][0]!r}), now "
                       f"{new[field]!r}")
  return changes


def move_aside(workdir: str) -> str | None:
  """Renames `workdir` to `<workdir>.old-<time>` (refused while a live
  process holds it); returns the new name, None if there was nothing."""
  if not os.path.exists(workdir):
    return None
  stamp = time.strftime("%Y%m%d-%H%M%S")
  target = f"{os.path.normpath(workdir)}.old-{stamp}"
  try:
    with lock(workdir):  # no run may start in it while it moves
      os.rename(workdir, target)
  except errors.WorkdirBusyError as e:
    raise errors.WorkdirBusyError(
        f"{e} It cannot be moved aside while it runs.") from None
  print(f"Moved the previous run to {target}.", flush=True)
  return target


# --------------------------------------------------------------- run folder


def read_records(workdir: str, up_to_step: int | None = None) -> list[Record]:
  """A run folder's records (those of steps <= up_to_step, if given)."""
  path = os.path.join(workdir, RECORDS)
  if not os.path.exists(path):
    return []
  return [r for r in read_jsonl(path)
          if up_to_step is None or r["step"] <= up_to_step]


class RunFolder:
  """A run's folder, as the train loop uses it:

    folder = RunFolder(workdir, config_json)
    with folder.lock():
      records = folder.finished_records()   # None unless it is done
      state, records = folder.resume(state_at_step_0)
      ... folder.append(record) ... folder.save(step, state) ...
      folder.mark_done()

  Files: config.json (the config it was started with), results.jsonl (one
  record per line), checkpoints/ (orbax, the last two), done. A run resumes
  only with the config it was started with (fields in
  MAY_CHANGE_ON_RESUME aside). Only the primary process writes files;
  every process takes part in checkpoint saves and restores, as orbax asks.
  """

  def __init__(self, path: str, config_json: str):
    self.path = path
    self.config_json = config_json
    self._manager: ocp.CheckpointManager | None = None
    self._inode: int | None = None  # the folder's, once resumed
    self._since = 0.0  # when it resumed

  def _gone(self) -> bool:
    """Whether the folder was moved or deleted since the run resumed."""
    if self._inode is None:
      return False
    try:
      return os.stat(self.path).st_ino != self._inode
    except FileNotFoundError:
      return True

  def _check_present(self, what: str) -> None:
    """errors.WorkdirGoneError if the folder was moved or deleted: the run
    stops rather than write anywhere (orbax would make the old path
    again)."""
    if self._gone():
      self._manager = None  # its folder is gone: nothing to close
      self._undo_recreated()
      raise errors.WorkdirGoneError(
          f"{self.path} was moved or deleted while the run trained "
          f"({what} failed); nothing more was written. Move it back and run "
          "the same command to resume from its last checkpoint, or start "
          "over with --fresh.")

  def _undo_recreated(self) -> None:
    """A save under way when the folder moved makes its old path again
    (orbax creates the checkpoint's parents): removes what it made there,
    its checkpoint (finished or not) and the folders made since the run
    resumed, and nothing else. A run's own folder always holds its config
    and records, so a folder holding only checkpoints/ is orbax's."""
    try:
      entries = os.listdir(self.path)
    except OSError:
      return
    if entries not in ([], [CHECKPOINTS]):
      return  # something else lives there now: leave it alone
    shutil.rmtree(self.path, ignore_errors=True)
    parent = os.path.dirname(os.path.abspath(self.path))
    while parent != os.path.dirname(parent):
      try:
        if os.stat(parent).st_ctime < self._since or os.listdir(parent):
          break
        os.rmdir(parent)
      except OSError:
        break
      parent = os.path.dirname(parent)

  @contextlib.contextmanager
  def _writing(self, what: str) -> Iterator[None]:
    """Turns the OS events of a write into one-line errors: the folder
    moved (errors.WorkdirGoneError), the disk full (errors.NoSpaceError,
    with no half-written checkpoint left)."""
    self._check_present(what)
    try:
      yield
      self._check_present(what)  # a save may have made the old path again
    except errors.UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      self._check_present(what)
      if not is_disk_full(e):
        raise
      note = self._resume_note()
      self._drop_unfinished_checkpoints()  # first: the space it frees counts
      raise no_space_error(e, self.file(RECORDS), what, note) from e

  def _resume_note(self) -> str:
    step = self._manager.latest_step() if self._manager is not None else None
    return (f" to resume from its last checkpoint (step {step})" if step
            else " to resume")

  def _drop_unfinished_checkpoints(self) -> None:
    """Removes orbax's temporary folders of a save that failed (a full
    disk): the next start would skip them, but they hold the space."""
    # The manager is dropped, not closed: closing it after a failed save
    # makes its background threads print tracebacks; the process ends next.
    self._manager = None
    for tmp in glob.glob(os.path.join(self.checkpoints,
                                      "*.orbax-checkpoint-tmp*")):
      shutil.rmtree(tmp, ignore_errors=True)

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def lock(self) -> contextlib.AbstractContextManager:
    return primary_lock(self.path)

  def check_config(self) -> None:
    """errors.WorkdirError, listing the differences, if the folder holds a
    run started with another config."""
    path = self.file(CONFIG)
    started = any(os.path.exists(self.file(name))
                  for name in (RECORDS, CHECKPOINTS, DONE))
    if not (started and os.path.exists(path)):
      return
    with open(path) as f:
      recorded = f.read()
    try:
      changes = config_changes(recorded, self.config_json,
                               MAY_CHANGE_ON_RESUME,
                               config_fields.absent_field_defaults())
    except json.JSONDecodeError as e:
      raise errors.WorkdirError(
          f"{path} is not valid JSON ({e.msg}), so this run's config is "
          "unknown; pass --fresh to move the run aside and start over.") from e
    if changes:
      raise errors.WorkdirError(
          f"{self.path} holds a run made with another config, so it cannot "
          f"be resumed: {'; '.join(changes)}. Use another --workdir, or pass "
          "--fresh to move the old run aside and start over.")

  def records(self, up_to_step: int | None = None) -> list[Record]:
    return read_records(self.path, up_to_step)

  def finished_records(self, recorded_steps: list[int] | None = None
                       ) -> list[Record] | None:
    """A finished run's records (says so), else None; checks the config
    first. `recorded_steps`: the steps a finished run has records of;
    errors.WorkdirError if any is missing (a table would count the run
    with records lost)."""
    self.check_config()
    if not os.path.exists(self.file(DONE)):
      return None
    records = self.records()
    if not records:
      raise errors.WorkdirError(
          f"{self.path} is marked done but has no records in {RECORDS}; pass "
          "--fresh to move it aside and train it again.")
    have = {r.get("step") for r in records}
    missing = [s for s in recorded_steps or () if s not in have]
    if missing:
      raise errors.WorkdirError(
          f"{self.path} is marked done but {RECORDS} lacks {len(missing)} of "
          f"its {len(recorded_steps)} records (steps {_steps_text(missing)}; "
          "deleted or cut?). Restore the file, or pass --fresh to move the "
          "run aside and train it again.")
    print(f"{self.path} is done; pass --fresh to train it again (the old "
          "run is moved aside).", flush=True)
    return records

  def resume(self, template: PyTree,
             recorded_steps: Callable[[int], list[int]] | None = None
             ) -> tuple[PyTree, list[Record]]:
    """(the state to train from, the records up to it): the newest readable
    checkpoint restored into `template` (laid out as it is), else
    `template`. Writes the config and drops records past the checkpoint.
    `recorded_steps(start_step)`: the steps whose records must be there
    before `start_step`; errors.WorkdirError, before anything is written,
    if any is missing (a run resumed without them would end done with
    records missing)."""
    self.check_config()
    if parallel.is_primary():
      os.makedirs(self.path, exist_ok=True)
    self._inode = os.stat(self.path).st_ino
    self._since = time.time()
    self._write(CONFIG, self.config_json + "\n")
    self._manager = ocp.CheckpointManager(
        os.path.abspath(self.file(CHECKPOINTS)),
        # A save cut short (killed, a full disk, the folder moved) leaves
        # a *.orbax-checkpoint-tmp folder; the next start removes it.
        options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                             cleanup_tmp_directories=True))
    state, records = template, []
    restored = self._restore(template)
    if restored is not None:
      state, start_step = restored
      records = self.records(start_step - 1)
      if recorded_steps is not None:
        self._check_records(records, recorded_steps(start_step), start_step)
      if parallel.is_primary():
        print(f"Resuming {self.path} from step {start_step}.", flush=True)
    self._write(RECORDS, "".join(json.dumps(r) + "\n" for r in records))
    return state, records

  def _check_records(self, records: list[Record], expected: list[int],
                     start_step: int) -> None:
    have = {r.get("step") for r in records}
    missing = [step for step in expected if step not in have]
    if missing:
      raise errors.WorkdirError(
          f"{self.file(RECORDS)} lacks {len(missing)} of the "
          f"{len(expected)} records before its checkpoint at step "
          f"{start_step} (steps {_steps_text(missing)}; deleted or cut?), "
          "and resuming would end the run done without them. Restore the "
          "file, or pass --fresh to move the run aside and train it again.")

  def append(self, record: Record) -> None:
    """Adds one record (a line, written and synced at once: a process
    killed mid-line leaves a torn last line, which read_jsonl drops)."""
    if not parallel.is_primary():
      return
    with self._writing(f"appending the record of step {record.get('step')} "
                       f"to {RECORDS}"):
      fd = os.open(self.file(RECORDS), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                   0o644)
      try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
      finally:
        os.close(fd)

  def save(self, step: int, state: PyTree) -> None:
    """A checkpoint of `state` after `step` steps, on disk when it returns."""
    with self._writing(f"saving the checkpoint of step {step}"):
      self._manager.save(step, args=ocp.args.StandardSave(_key_data(state)))
      self._manager.wait_until_finished()

  def latest_checkpoint_step(self) -> int:
    return self._manager.latest_step() or 0

  @property
  def checkpoints(self) -> str:
    return self.file(CHECKPOINTS)

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None

  def mark_done(self) -> None:
    """Writes `done`: a finished run is not trained again."""
    with self._writing("closing its checkpoints"):
      self.close()
    self._write(DONE, "done\n")

  def _write(self, name: str, text: str) -> None:
    if parallel.is_primary():
      with self._writing(f"writing {name}"):
        write_text(self.file(name), text)

  def _restore(self, template: PyTree) -> tuple[PyTree, int] | None:
    """(the newest readable checkpoint, its step); None if there is none.
    One that cannot be read is moved to corrupt_checkpoints/ with a
    message, and the one before it is tried; errors.WorkdirError if none
    can be read."""
    manager = self._manager
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _key_data(template))
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
      try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as e:  # pylint: disable=broad-except
        _raise_unless_unreadable(e, step, self.checkpoints)
        aside = os.path.join(self.file(CORRUPT_CHECKPOINTS),
                             f"{step}-{int(time.time())}")
        if parallel.is_primary():
          os.makedirs(os.path.dirname(aside), exist_ok=True)
          os.rename(os.path.join(self.checkpoints, str(step)), aside)
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        print(f"warning: the checkpoint of step {step} cannot be read "
              f"({type(e).__name__}: {reason}); moved it to {aside} and "
              "trying the one before.", file=sys.stderr, flush=True)
        manager.reload()
        continue
      return _wrap_keys(restored, template), step
    if steps:
      raise errors.WorkdirError(
          f"None of the {len(steps)} checkpoints in {self.checkpoints} can be "
          f"read (moved to {self.file(CORRUPT_CHECKPOINTS)}); run again to "
          "start from step 0, or pass --fresh to move the whole run aside "
          "first.")
    return None


def _steps_text(steps: list[int]) -> str:
  shown = ", ".join(map(str, steps[:5]))
  return shown + (f", ... {steps[-1]}" if len(steps) > 5 else "")


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _key_data(tree: PyTree) -> PyTree:
  """`tree` with its PRNG keys as their raw data (what orbax can save)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x,
                      tree)


def _wrap_keys(restored: PyTree, template: PyTree) -> PyTree:
  return jax.tree.map(
      lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
      if _is_key(t) else x, restored, template)


# Restore errors that say the checkpoint is fine but this run differs from it
# (or the machine is short of memory): the files stay where they are.
_NOT_CORRUPTION = ("Structure mismatch", "tree structure", "RESOURCE_EXHAUSTED",
                   "out of memory", "shape mismatch", "Shape mismatch")


def _raise_unless_unreadable(error: Exception, step: int,
                             directory: str) -> None:
  if isinstance(error, MemoryError) or any(
      text in str(error) for text in _NOT_CORRUPTION):
    raise errors.WorkdirError(
        f"The checkpoint of step {step} in {directory} does not fit this run "
        f"({type(error).__name__}: {str(error).strip()[:300]}). The code or "
        "the model changed since it was written, or memory ran out; nothing "
        "was moved. Use the code that wrote it, another --workdir, or "
        "--fresh.") from error
