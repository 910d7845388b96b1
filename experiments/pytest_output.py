"""What a pytest run printed, read back (no absl flags here: tests import it
beside the experiments that define theirs)."""

import re


def failures(output: str) -> dict[str, str]:
  """Failed tests in pytest's output, each with its one-line reason: from
  the short summary (`FAILED id - reason`), else from the verbose lines
  (`[gw0] [ 5%] FAILED id`) of a run cut short."""
  found = {}
  for line in output.splitlines():
    match = re.search(r"FAILED (\S+::\S+)(?: - (.*))?$", line.strip())
    if match and (match[2] or match[1] not in found):
      found[match[1]] = (match[2] or "").strip()
  return found
