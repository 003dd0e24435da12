"""The documents: README.md is a front page (at most 20,000 bytes, a table of contents, a link to every guide),
and every relative link in every Markdown file of the repository reaches an existing file, and its #anchor an
existing heading of that file (GitHub's heading slugs)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
README_MAX_BYTES = 20_000
# Generated reports that live with their data, not guides: they need no link from the front page.
NOT_GUIDES = ("tests/data/results/",)


def doc(path: str) -> str:
    """The text of the document at `path` (relative to the repository root)."""
    return (ROOT / path).read_text()


def markdown_files() -> list[Path]:
    """Every Markdown file of the checkout that git tracks or would track (not ignored: no .venv, runs, data)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        files = [ROOT / p for p in out if (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):  # no git (an exported tree): every .md outside ignored folders
        skip = {".venv", ".venv-k8s", "runs", "data", ".git", ".pytest_cache"}
        files = [p for p in ROOT.rglob("*.md") if not skip & set(p.relative_to(ROOT).parts[:1])]
    return sorted(files)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def headings(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", _without_fences(text), re.M)]


def _without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, _ and - stay), spaces
    to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of a document; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        s = slug(h)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def links(text: str) -> list[str]:
    """Targets of the Markdown links and images of a document, outside code."""
    return [m.group(1) for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(text))]


def test_slugs_are_githubs():
    assert slug("Comparing methods: `python -m trainer compare`") == "comparing-methods-python--m-trainer-compare"
    assert slug("Third CPU run: 30 % label noise — and the efficient variants") == (
        "third-cpu-run-30--label-noise--and-the-efficient-variants"
    )
    assert slug("GPU suite: `python -m trainer.bench.gpu_suite`") == "gpu-suite-python--m-trainerbenchgpu_suite"
    assert slug("Progress: a log line, and the TrainJob's own status") == (
        "progress-a-log-line-and-the-trainjobs-own-status"
    )


def test_the_documents_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert "README.md" in names and "trainer/recipes/PARITY.md" in names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path: Path):
    text = path.read_text()
    bad = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked offline
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
            continue
        if anchor:
            if dest.suffix != ".md":
                bad.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest.read_text()):
                bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{path.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_readme_is_a_front_page_with_a_table_of_contents():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move text into the guide it belongs to"
    text = README.read_text()
    own = {t[1:] for t in links(text) if t.startswith("#")}
    sections = {slug(h) for h in re.findall(r"^## (.*)$", _without_fences(text), re.M)}
    assert sections and sections <= own, f"sections missing from the table of contents: {sections - own}"


def test_every_guide_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README.read_text()) if not t.startswith("#")}
    guides = [p for p in markdown_files() if p != README and not p.relative_to(ROOT).as_posix().startswith(NOT_GUIDES)]
    assert len(guides) >= 6
    missing = [p.relative_to(ROOT).as_posix() for p in guides if p.resolve() not in linked]
    assert not missing, f"guides the README does not link: {missing}"


def test_documents_speak_of_the_product_only():
    """What is verified and how, not who had which machine."""
    words = r"\b(lent|sessions?|development machines?|could not be checked from here)\b"
    found = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in markdown_files()
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(words, line, re.I)
    ]
    assert not found, "\n".join(found)
