"""docs/internals.md and tests/contracts/ cannot drift apart.

Every entry of the document has its fields and names contract tests that exist; every
contract test is named by an entry; the versions it states are the ones pinned.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "internals.md"
CONTRACTS = Path(__file__).resolve().parent
FIELDS = ("Where", "Overrides", "Pinned", "Why", "If upstream changes", "Status", "Contract tests")
STATUSES = {"needed", "at risk", "droppable"}
TEST_REF = re.compile(r"`(tests/contracts/[\w/]+\.py)::(\w+)`")
VERSION = re.compile(r"([A-Za-z][\w.-]*) (\d+(?:\.\d+)+)")


def entries(text: str) -> dict[str, dict[str, str]]:
    """{heading: {field: value}} of the "## Overrides" section."""
    section = text.split("\n## Overrides\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, dict[str, str]] = {}
    for block in re.split(r"^### ", section, flags=re.M)[1:]:
        heading, _, body = block.partition("\n")
        fields = dict(re.findall(r"^- \*\*(.+?):\*\* (.*)$", body, flags=re.M))
        found[heading.strip()] = fields
    return found


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def pins() -> dict[str, str]:
    pinned = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z][\w.-]*)(?:\[[^\]]*\])?==(\S+)", line)
        if match:
            pinned[match[1].lower()] = match[2]
    return pinned


DOCUMENTED = entries(DOC.read_text())


def test_the_document_lists_overrides():
    assert len(DOCUMENTED) >= 30


@pytest.mark.parametrize("heading", DOCUMENTED)
def test_each_entry_has_every_field(heading):
    fields = DOCUMENTED[heading]

    assert [name for name in FIELDS if not fields.get(name, "").strip()] == []
    assert fields["Status"].strip() in STATUSES


@pytest.mark.parametrize("heading", DOCUMENTED)
def test_each_entry_names_contract_tests_that_exist(heading):
    refs = TEST_REF.findall(DOCUMENTED[heading]["Contract tests"])

    assert refs, "an entry names at least one contract test"
    for file, name in refs:
        path = ROOT / file
        assert path.parent == CONTRACTS and path.exists(), file
        assert name in defined_tests(path), f"{file}::{name}"


@pytest.mark.parametrize("heading", DOCUMENTED)
def test_each_entry_states_the_pinned_versions(heading):
    stated = VERSION.findall(DOCUMENTED[heading]["Pinned"])
    pinned = pins()

    assert stated, "an entry says which pinned version it was checked against"
    for package, version in stated:
        assert pinned.get(package.lower()) == version, f"{package} {version} is not the pin"


def test_every_contract_test_is_named_by_an_entry():
    named = {
        (file, name)
        for fields in DOCUMENTED.values()
        for file, name in TEST_REF.findall(fields["Contract tests"])
    }
    here = Path(__file__).name
    unnamed = [
        f"{path.name}::{name}"
        for path in sorted(CONTRACTS.glob("test_*.py"))
        if path.name != here
        for name in sorted(defined_tests(path))
        if (f"tests/contracts/{path.name}", name) not in named
    ]

    assert unnamed == []
