"""The README stays true: CI runs its test command, its commands name real
files."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
  with open(os.path.join(ROOT, *path)) as f:
    return f.read()


def _blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", _read("README.md"), re.S)


def test_ci_runs_the_readme_test_command():
  commands = [b.strip() for b in _blocks("bash") if "pytest" in b]
  assert len(commands) == 1, commands
  ci_lines = [l.strip() for l in _read(".ci", "run").splitlines()]
  assert commands[0] in ci_lines


def test_readme_main_command_names_real_files():
  main = next(b for b in _blocks("bash") if "--workdir" in b and "pytest" not in b)
  config = re.search(r"--config (\S+)", main).group(1).split(":")[0]
  assert os.path.exists(os.path.join(ROOT, config))
