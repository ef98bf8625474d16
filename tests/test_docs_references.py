"""Every citation of the contract resolves: docs/README.md ("Citing a section") states the rules.

The tracked text files are read once. A `§N` must name a `## N.` / `### N.M` heading of
docs/contract.md, a line outside docs/ that uses one must name docs/contract.md, every `docs/<file>.md`
path must exist, no citation of the former team contract may remain, and no file name or text outside
CHANGELOG.md may name a tracker item, and a source path that docs/ names must be a tracked file. The
rules are also run on made-up text, so each is shown to fire.
"""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
CONTRACT = "docs/contract.md"
TEXT_SUFFIXES = (".py", ".md", ".cpp", ".h", ".toml", ".in", ".cfg", ".txt", ".sh")
TEXT_NAMES = ("Makefile",)
TRACKER_EXEMPT = ("CHANGELOG.md",)

SIGN = "\u00a7"  # written as an escape so that this file's own text holds no citation
SECTION_HEADING = re.compile(r"^(?:## (\d+)\.|### (\d+\.\d+)) ", re.MULTILINE)
SECTION_CITATION = re.compile(SIGN + r"\s*(\d+(?:\.\d+)*)")
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)\b")
FORMER_CONTRACT = re.compile(r"\bSPEC(?:\s*" + SIGN + r"|\.md\b)")
SOURCE_PATH = re.compile(r"`((?:repa_kernels|csrc|tests|benchmarks|python)/[\w/.-]+)`")
TRACKER_ITEM = re.compile(r"(?<![a-z])issue[ _-]?#?\d+", re.IGNORECASE)


def contract_sections(text: str) -> set[str]:
    """The section numbers of the contract: "2" for `## 2. ...`, "2.1" for `### 2.1 ...`."""
    return {major or minor for major, minor in SECTION_HEADING.findall(text)}


def citation_problems(path: str, text: str, sections: set[str], existing_docs: set[str]) -> list[str]:
    """Sections that do not exist, signs without the contract's path (outside docs/), missing docs files."""
    problems = []
    inside_docs = path.startswith("docs/")
    for number, line in enumerate(text.splitlines(), 1):
        cited = SECTION_CITATION.findall(line)
        for section in cited:
            if section not in sections:
                problems.append(f"{path}:{number}: {SIGN}{section} is not a section of {CONTRACT} "
                                f"(it has {', '.join(sorted(sections, key=_section_key))}): {line.strip()}")
        if cited and not inside_docs and CONTRACT not in line:
            problems.append(f"{path}:{number}: write the citation as `{CONTRACT} {SIGN}N` on the line that "
                            f"uses it: {line.strip()}")
        for name in DOCS_PATH.findall(line):
            if name not in existing_docs:
                problems.append(f"{path}:{number}: docs/{name} does not exist: {line.strip()}")
    return problems


def source_path_problems(path: str, text: str, tracked: set[str]) -> list[str]:
    """Source files that a document in docs/ names in backticks but the tree does not hold (moved or renamed)."""
    if not path.startswith("docs/"):
        return []
    return [f"{path}:{number}: {name} is not a tracked file; follow the move or rename: {line.strip()}"
            for number, line in enumerate(text.splitlines(), 1) for name in SOURCE_PATH.findall(line)
            if name not in tracked]


def former_contract_problems(path: str, text: str) -> list[str]:
    return [f"{path}:{number}: cites the former team contract; cite {CONTRACT} instead: {line.strip()}"
            for number, line in enumerate(text.splitlines(), 1) if FORMER_CONTRACT.search(line)]


def tracker_problems(path: str, text: str) -> list[str]:
    """Tracker items named in the file's path or text (CHANGELOG.md may name them)."""
    if path in TRACKER_EXEMPT:
        return []
    problems = [f"{path}: the file name names a tracker item; name it after what it does"] \
        if TRACKER_ITEM.search(path) else []
    return problems + [f"{path}:{number}: names a tracker item; say what the code does instead: {line.strip()}"
                       for number, line in enumerate(text.splitlines(), 1) if TRACKER_ITEM.search(line)]


def _section_key(section: str) -> tuple[int, ...]:
    return tuple(int(part) for part in section.split("."))


@lru_cache(maxsize=1)
def tracked_paths() -> tuple[str, ...]:
    """Every tracked path of the checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPOSITORY, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc}): there is no list of tracked files to read")
    return tuple(sorted(path for path in listed.stdout.decode().split("\0") if path))


@lru_cache(maxsize=1)
def tracked_text_files() -> tuple[tuple[str, str], ...]:
    """(path, text) of every tracked text file of the checkout (the working tree's contents)."""
    files = []
    for path in tracked_paths():
        full = REPOSITORY / path
        if (path.endswith(TEXT_SUFFIXES) or Path(path).name in TEXT_NAMES) and full.is_file():
            files.append((path, full.read_text(encoding="utf-8")))
    return tuple(files)


@lru_cache(maxsize=1)
def tree_facts() -> tuple[set[str], set[str]]:
    """(the contract's sections, the names of the files in docs/)."""
    return (contract_sections((REPOSITORY / CONTRACT).read_text(encoding="utf-8")),
            {p.name for p in (REPOSITORY / "docs").glob("*.md")})


# ---- the tree ------------------------------------------------------------------------------------


def test_contract_has_the_cited_section_numbering():
    sections, _ = tree_facts()
    assert {str(n) for n in range(1, 9)} | {"2.1", "2.2"} <= sections, sorted(sections, key=_section_key)


def test_every_citation_resolves():
    sections, existing_docs = tree_facts()
    problems = [problem for path, text in tracked_text_files()
                for problem in citation_problems(path, text, sections, existing_docs)]
    assert not problems, "\n".join(problems)


def test_docs_name_existing_source_files():
    files = set(tracked_paths())
    tracked = files | {str(parent) + "/" for path in files for parent in Path(path).parents if str(parent) != "."}
    problems = [problem for path, text in tracked_text_files() for problem in source_path_problems(path, text, tracked)]
    assert not problems, "\n".join(problems)


def test_no_citation_of_the_former_team_contract():
    problems = [problem for path, text in tracked_text_files() for problem in former_contract_problems(path, text)]
    assert not problems, "\n".join(problems)


def test_no_tracker_item_outside_the_changelog():
    problems = [problem for path, text in tracked_text_files() for problem in tracker_problems(path, text)]
    assert not problems, "\n".join(problems)


def test_readme_links_the_docs():
    assert "docs/README.md" in (REPOSITORY / "README.md").read_text(encoding="utf-8")


# ---- each rule fires on made-up text ---------------------------------------------------------------

SECTIONS = {"1", "2", "2.1", "2.2", "3"}
DOCS = {"README.md", "contract.md"}


def cite(section: str) -> str:
    return f"{CONTRACT} {SIGN}{section}"


@pytest.mark.parametrize("line", [
    f"loss of {cite('2.1')}", f"math of {cite('2.2')}, {SIGN}3", f"facade ({cite('1')}-{SIGN}3)",
    f"end of a sentence, {cite('2.1')}.", f"{cite('2')} layer 3, {SIGN}2.1",
])
def test_valid_citations_pass(line):
    assert citation_problems("pkg/module.py", line, SECTIONS, DOCS) == []


@pytest.mark.parametrize("line, fragment", [
    (f"schedule of {cite('4')}", f"{SIGN}4 is not a section"),
    (f"math of {cite('2.3')}", f"{SIGN}2.3 is not a section"),
    (f"facade ({cite('1')}-{SIGN}9)", f"{SIGN}9 is not a section"),
    (f"the math ({SIGN}2.1)", "on the line that uses it"),
    ("see docs/" + "kernel.md", "kernel.md does not exist"),
])
def test_broken_citations_fail(line, fragment):
    problems = citation_problems("pkg/module.py", line, SECTIONS, DOCS)
    assert len(problems) == 1 and fragment in problems[0], problems


def test_a_bare_sign_is_allowed_inside_docs_only():
    assert citation_problems("docs/kernels.md", f"the math ({SIGN}2.1)", SECTIONS, DOCS) == []
    assert citation_problems("docs/kernels.md", f"the math ({SIGN}7)", SECTIONS, DOCS) != []


def test_contract_sections_are_read_from_its_headings():
    text = "# Title\n\n## 1. First\n\n## 2. Math\n\n### 2.1 Cosine\n\ntext ## 5. not a heading\n#### 2.1.1 deeper\n"
    assert contract_sections(text) == {"1", "2", "2.1"}


@pytest.mark.parametrize("line", [f"the SPEC {SIGN}2 math", f"SPEC{SIGN}4", "see SPEC" + ".md"])
def test_former_contract_citations_fail(line):
    assert former_contract_problems("a.py", line) != []


def test_a_moved_source_file_fails():
    line = "the kernel (`repa_kernels/ops/crepa_triton.py`) and the loader (`repa_kernels/ops/loader.py`)"
    tracked = {"repa_kernels/ops/crepa_triton.py"}
    problems = source_path_problems("docs/kernels.md", line, tracked)
    assert len(problems) == 1 and "repa_kernels/ops/loader.py is not a tracked file" in problems[0], problems
    assert source_path_problems("docs/kernels.md", "`repa_kernels/ops/crepa_triton.py`", tracked) == []


def test_former_contract_rule_leaves_other_words_alone():
    assert former_contract_problems("a.py", "SPEC_CREPA_DEFAULTS, INSPECT, spec_math.py") == []


@pytest.mark.parametrize("path, line", [
    ("tests/test_x.py", "the tolerance rule of issue" + " 3"),
    ("tests/test_x.py", "(Issue" + " 7, item 2)"),
    ("benchmarks/cpu_kernels_issue" + "4.py", "nothing in the text"),
])
def test_tracker_items_fail_outside_the_changelog(path, line):
    assert tracker_problems(path, line) != []
    assert tracker_problems("CHANGELOG.md", line) == []


def test_tracker_rule_leaves_other_words_alone():
    assert tracker_problems("a.py", "issues of the tracker, tissue paper, issued 3 times") == []
