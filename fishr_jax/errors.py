"""Errors a user can act on, each with the exit code the command line gives.

The command line (fishr_jax/cli.py) prints their message as one line and
exits with `exit_code`; any other exception is a bug, and its traceback goes
to the workdir's error log.
"""


class UserError(Exception):
  """A mistake or a state of the world the user can fix; the message says how."""
  exit_code = 1


class ConfigError(UserError, ValueError):
  """A config field (or flag) has a value that cannot work."""
  exit_code = 2


class DataError(UserError):
  """A data file is missing, cut short or unreadable; the message names it."""
  exit_code = 3


class DivergedError(UserError):
  """The loss or the parameters became non-finite; no `done` is written."""
  exit_code = 4


class WorkdirError(UserError):
  """The workdir's files disagree with the run (another config, corrupt
  checkpoints)."""
  exit_code = 5


class WorkdirGoneError(WorkdirError):
  """The run folder was moved or deleted while the run trained; nothing
  more is written (least of all at its old path)."""


class NoSpaceError(UserError):
  """The disk holding the run folder is full; the message names the path
  and the space left. The last checkpoint stays, so the run resumes."""
  exit_code = 74  # EX_IOERR


class WorkdirBusyError(UserError):
  """Another live process owns the workdir (its lock file)."""
  exit_code = 75  # EX_TEMPFAIL: try again later


class RecordsError(WorkdirError, ValueError):
  """A results.jsonl that is missing, malformed or lacks fields."""


class PeerProcessError(UserError):
  """Another process of a multi-process job died (its connection closed or
  its heartbeat stopped); restarting the job resumes from the last
  checkpoint."""
  exit_code = 6
