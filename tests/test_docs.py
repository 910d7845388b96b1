"""The docs stay true: every relative link of the markdown pages (README.md,
docs/, results/) points to an existing file (and heading), and docs/api.md's
examples run."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(["README.md", "tests/data/README.md"] + [
    os.path.relpath(p, ROOT) for folder in ("docs", "results")
    for p in glob.glob(os.path.join(ROOT, folder, "**", "*.md"), recursive=True)])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _read(path):
  with open(os.path.join(ROOT, path)) as f:
    return f.read()


def _without_code(text):
  """The text outside fenced code blocks and inline code."""
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path):
  """GitHub's heading ids of a markdown file."""
  anchors, seen = set(), {}
  for line in re.sub(r"```.*?```", "", _read(path), flags=re.S).splitlines():
    heading = re.match(r"#+\s+(.*)", line)
    if not heading:
      continue
    text = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
    count = seen.get(text, 0)
    seen[text] = count + 1
    anchors.add(text if count == 0 else f"{text}-{count}")
  return anchors


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_to_files_and_headings(page):
  broken = []
  for target in LINK.findall(_without_code(_read(page))):
    if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    resolved = (os.path.normpath(os.path.join(os.path.dirname(page), path))
                if path else page)
    if not os.path.exists(os.path.join(ROOT, resolved)):
      broken.append(target)
    elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
      broken.append(target)
  assert not broken, f"{page}: broken links {broken}"


def test_api_examples_run(capsys):
  examples = re.findall(r"```python\n(.*?)```", _read("docs/api.md"), re.S)
  assert examples
  for example in examples:
    exec(compile(example, "docs/api.md", "exec"), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out


def test_every_algorithm_is_listed_in_the_readme_and_docs_algorithms():
  """A registered algorithm is in README's list and has a row in
  docs/algorithms.md, with its DomainBed name."""
  from fishr_jax.algorithms import registry
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = " ".join(f.read().split())
  with open(os.path.join(ROOT, "docs", "algorithms.md")) as f:
    rows = f.read()
  for name in registry.names():
    domainbed = registry.get(name).domainbed.name
    assert f"`{name}` ({domainbed})" in readme, name
    assert f"| `{name}` | {domainbed} |" in rows, name
