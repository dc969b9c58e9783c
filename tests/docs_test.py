"""The README and docs/ hold together: every relative link and anchor resolves, and the README
stays a page a newcomer reads (at most about 200 lines)."""

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _pages():
  return [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))),
          os.path.join(REPO, "benchmarks", "RESULTS.md")]


def slug(heading: str) -> str:
  """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to '-'."""
  text = re.sub(r"[`*_]{2,}|`", "", heading.strip()).lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set[str]:
  with open(path) as f:
    text = _FENCE.sub("", f.read())
  return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def links(path: str):
  """(target path, anchor or None) of every relative link outside code blocks."""
  with open(path) as f:
    text = _FENCE.sub("", f.read())
  for target in _LINK.findall(text):
    if re.match(r"[a-z]+://|mailto:", target):
      continue
    file_part, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    yield full, anchor or None


def test_slug_follows_github():
  assert slug("GPT-2 zero-shot perplexity (the paper's text table)") == (
      "gpt-2-zero-shot-perplexity-the-papers-text-table")
  assert slug("Paper configs: size, FLOPs, memory (`benchmarks/paper_configs.py`)") == (
      "paper-configs-size-flops-memory-benchmarkspaper_configspy")


def test_every_relative_link_resolves():
  broken = []
  for page in _pages():
    for target, anchor in links(page):
      rel = os.path.relpath(page, REPO)
      if not os.path.exists(target):
        broken.append(f"{rel}: {os.path.relpath(target, REPO)} does not exist")
      elif anchor and target.endswith(".md") and anchor not in anchors(target):
        broken.append(f"{rel}: no heading #{anchor} in {os.path.relpath(target, REPO)}")
  assert not broken, "\n".join(broken)


def test_readme_is_short():
  with open(os.path.join(REPO, "README.md")) as f:
    lines = f.read().count("\n")
  assert lines <= 220, f"README.md has {lines} lines; move detail to docs/"
