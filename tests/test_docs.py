"""The documents hold together: relative links resolve inside the repository, docs/SPEC.md cites oracle functions
that exist (and every public one), and every "SPEC N" cited in code or docs is a section of docs/SPEC.md.
Reads files only; runs no kernel."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import qlora.reference

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "SPEC.md"
DOCUMENTS = sorted({ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "perf").rglob("*.md")})
SOURCE_DIRS = ("kernels", "reference", "qlora", "perf", "tests")

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
ORACLE_CITATION = re.compile(r"`reference\.(\w+)\.(\w+)`")
SPEC_CITATION = re.compile(r"\bSPEC(?:\.md)?,? (?:sections? )?(\d+)(?:-(\d+))?")


def _prose(text: str) -> str:
    """Markdown without fenced blocks and code spans: what a renderer turns into links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", markdown.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(document: Path) -> list[str]:
    prose = _prose(document.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def _is_external(target: str) -> bool:
    return re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) is not None  # https:, mailto:, ...


def test_the_documents_are_found():
    names = {d.relative_to(ROOT).as_posix() for d in DOCUMENTS}
    assert {"README.md", "docs/SPEC.md", "docs/DESIGN.md", "perf/README.md"} <= names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_the_repository(document):
    problems = []
    for target in _links(document):
        if _is_external(target):
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (document.parent / path_part).resolve() if path_part else document
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{target}: points outside the repository ({resolved})")
            continue
        if not resolved.exists():
            problems.append(f"{target}: {resolved.relative_to(ROOT)} does not exist")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            problems.append(f"{target}: {resolved.relative_to(ROOT)} has no heading with anchor #{fragment}")
    assert not problems, f"{document.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_no_document_points_to_a_contract_outside_the_repository(document):
    # The contract used to live at ../shared/SPEC.md, which a clone of this repository does not have.
    assert "shared/SPEC" not in document.read_text(encoding="utf-8")


def test_link_checker_catches_what_it_must():
    # The checks above are only as good as the link and anchor parsing: pin it on a known text.
    sample = (
        "See [the contract](docs/SPEC.md#2-blockwise-quantization-4-bit-and-8-bit), [web](https://x.org),\n"
        "`[not](a-link.md)` and\n```\n[nor](this.md)\n```\n[ref]: ../outside.md\n"
    )
    prose = _prose(sample)
    assert INLINE_LINK.findall(prose) == ["docs/SPEC.md#2-blockwise-quantization-4-bit-and-8-bit", "https://x.org"]
    assert REFERENCE_LINK.findall(prose) == ["../outside.md"]
    assert "2-blockwise-quantization-4-bit-and-8-bit" in _anchors(SPEC)
    assert "non-finite-values" in _anchors(ROOT / "docs" / "DESIGN.md")


def _oracle_citations() -> list[tuple[str, str]]:
    return ORACLE_CITATION.findall(SPEC.read_text(encoding="utf-8"))


def test_spec_cites_oracle_functions_that_exist_where_it_says():
    citations = _oracle_citations()
    assert len(citations) >= 12, "docs/SPEC.md lost its oracle citations"
    for module_name, name in citations:
        module = importlib.import_module(f"qlora.reference.{module_name}")
        assert hasattr(module, name), f"docs/SPEC.md cites reference.{module_name}.{name}, which does not exist"
        value = getattr(module, name)
        if callable(value):  # defined there, not merely imported there
            assert value.__module__ == module.__name__, (
                f"docs/SPEC.md cites reference.{module_name}.{name}, defined in {value.__module__}"
            )


def test_spec_cites_every_public_oracle_function():
    cited = {f"{module}.{name}" for module, name in _oracle_citations()}
    for name in qlora.reference.__all__:
        function = getattr(qlora.reference, name)
        where = f"{function.__module__.removeprefix('qlora.reference.')}.{name}"
        assert where in cited, f"docs/SPEC.md does not cite the oracle function reference.{where}"


def _spec_sections() -> set[int]:
    return {int(n) for n in re.findall(r"^## (\d+)\. ", SPEC.read_text(encoding="utf-8"), re.M)}


def test_every_cited_spec_section_exists():
    sections = _spec_sections()
    assert sections == set(range(1, 9)), sections
    files = [*DOCUMENTS, *(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))]
    missing = []
    for path in files:
        for first, last in SPEC_CITATION.findall(path.read_text(encoding="utf-8")):
            wanted = set(range(int(first), int(last or first) + 1))
            if not wanted <= sections:
                missing.append(f"{path.relative_to(ROOT)}: SPEC {first}{'-' + last if last else ''}")
    assert not missing, "cited SPEC sections that docs/SPEC.md does not have:\n" + "\n".join(missing)
