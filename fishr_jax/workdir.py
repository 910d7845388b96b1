"""A run folder's files, written so that a killed process or a second one
never corrupts them.

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
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Iterator

from fishr_jax import errors

LOCK = "lock"
CONFIG = "config.json"

# How long lock() waits for a flock held for a moment (is_locked's probe).
_BUSY_RETRY_S = 2.0
# Locks this process holds: workdir -> (file descriptor, depth). flock is per
# open file, so a nested lock() of the same folder must reuse the first.
_HELD: dict[str, list] = {}


def write_text(path: str, text: str) -> None:
  """Replaces `path` by `text` atomically (temporary file, fsync, rename)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


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


# --------------------------------------------------------- config changes


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: value}


def config_changes(recorded_json: str, config_json: str,
                   may_change: tuple[str, ...] = ()) -> list[str]:
  """'field: recorded X, now Y' for each field both configs have that
  differs, except those in `may_change` (settings that do not change the
  results)."""
  old = _flatten(json.loads(recorded_json))
  new = _flatten(json.loads(config_json))
  changes = []
  # A field on one side only (added to or dropped from the config since
  # the run started) is not a change of the run.
  for field in sorted(set(old) & set(new)):
    if field.split(".")[-1] in may_change or old[field] == new[field]:
      continue
    changes.append(f"{field}: recorded {old[field]!r}, now {new[field]!r}")
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
