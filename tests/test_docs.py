"""The README and docs/ stay true to the project: the README stays a short front page, every docs page exists and
links back to it, every relative link resolves (to a file, and an #anchor to a heading of that file), and every
command line in a fenced code block that runs an entry point composes and passes the project's own value check,
every job of a multirun included. In process (Hydra's compose API), so the whole file runs in seconds."""
from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from ernie_lab.config import PROJECT_ROOT, check_overrides
from ernie_lab.errors import ErnieLabError
from tests.conftest import make_cfg

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
PAGES = ["tasks-and-data", "weights-and-training", "compression", "engines-and-precisions", "benchmark-and-roofline",
         "tracking-and-reports", "scaling-out", "results", "layout", "dependencies"]
README_MAX_LINES = 200
DOC_FILES = [README, *sorted(DOCS.glob("*.md"))]

# The entry points a documented command may run, and the primary config each composes.
SCRIPTS = {"train.py": "config", "compress.py": "config", "infer.py": "config"}
MODULES = {"ernie_lab.pipeline": "pipeline", "ernie_lab.report": "report"}
# Hydra's own command-line flags: not overrides. Those listed with True take a value (`--cfg job`, `-p train`).
HYDRA_FLAGS = {"-m": False, "--multirun": False, "--cfg": True, "-c": True, "--package": True, "-p": True,
               "--resolve": False, "--info": False, "-i": False, "--help": False, "--hydra-help": False,
               "--run": False, "-r": False, "--shell-completion": False, "-sc": False}
# Jobs composed per multirun line: the full product of the swept values up to this many, and always every swept
# value at least once (each one with the first value of the others), as the project's own pre-flight check does.
MAX_COMBINATIONS = 12
# A command is a template, not a runnable line, when it holds a placeholder: `<id>`, `<time>` (angle brackets) or
# `...` (an elided value). Such lines are skipped, by this rule alone.
PLACEHOLDER = re.compile(r"<[^<>\s]+>|\.\.\.")
SHELL_OPERATORS = {"&&", "||", "|", ";"}

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _rel(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT))


def _prose_lines(path: Path):
    """(line number, text) of every line outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def _code_lines(path: Path):
    """(line number, command) of every logical line inside fenced code blocks, `\\` continuations joined."""
    fenced, pending, start = False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercased, punctuation other than hyphens, underscores and
    spaces removed, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in _prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def _links():
    for path in DOC_FILES:
        for number, line in _prose_lines(path):
            text = INLINE_CODE.sub("", line)
            for match in [*LINK.finditer(text), *IMAGE.finditer(text)]:
                target = match.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                    continue
                yield pytest.param(path, number, target, id=f"{_rel(path)}:{number}:{target}")


@dataclass
class Command:
    path: Path
    number: int
    text: str
    config_name: str
    overrides: list[str]
    multirun: bool


def _entry_point(tokens: list[str]) -> tuple[str, list[str]] | None:
    """The config name and the arguments after the entry point, if `tokens` runs one: `python <script>`,
    `python -m <module>`, any python executable (`.venv/bin/python`), `python -m paddle.distributed.launch ...
    <script>` (the launcher's own options before the script are dropped)."""
    if not tokens or not re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", tokens[0]):
        return None
    rest = tokens[1:]
    if rest[:1] == ["-m"] and len(rest) > 1:
        if rest[1] in MODULES:
            return MODULES[rest[1]], rest[2:]
        if rest[1] != "paddle.distributed.launch":
            return None
        rest = rest[2:]
    for i, token in enumerate(rest):
        if Path(token).name in SCRIPTS:
            return SCRIPTS[Path(token).name], rest[i + 1:]
        if not token.startswith("-") and i == 0 and tokens[1] != "-m":
            return None  # `python something_else.py`
    return None


def _split_args(args: list[str]) -> tuple[list[str], bool]:
    overrides, multirun, skip_next = [], False, False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg in HYDRA_FLAGS:
            multirun |= arg in ("-m", "--multirun")
            skip_next = HYDRA_FLAGS[arg]
            continue
        if arg.startswith("-"):
            continue
        overrides.append(arg)
    return overrides, multirun


def _commands():
    for path in DOC_FILES:
        for number, text in _code_lines(path):
            try:
                tokens = shlex.split(text, comments=True)
            except ValueError:
                continue  # not shell (e.g. the layout's directory listing)
            segments, current = [], []
            for token in tokens:
                if token in SHELL_OPERATORS:
                    segments.append(current)
                    current = []
                else:
                    current.append(token)
            segments.append(current)
            for segment in segments:
                entry = _entry_point(segment)
                if entry is None:
                    continue
                shown = " ".join(segment)
                if PLACEHOLDER.search(shown):
                    continue  # a template: see PLACEHOLDER
                config_name, args = entry
                overrides, multirun = _split_args(args)
                yield pytest.param(Command(path, number, shown, config_name, overrides, multirun),
                                   id=f"{_rel(path)}:{number}")


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of the jobs a command line starts: one, or a multirun's combinations of swept values."""
    if not multirun:
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            lhs = override.split("=", 1)[0]
            choices.append([f"{lhs}={value}" for value in parsed.sweep_string_iterator()])
        else:
            choices.append([override])
    jobs = list(itertools.islice(itertools.product(*choices), MAX_COMBINATIONS))
    first = [c[0] for c in choices]
    for position, values in enumerate(choices):
        for value in values[1:]:
            jobs.append(tuple(first[:position] + [value] + first[position + 1:]))
    return [list(job) for job in dict.fromkeys(jobs)]


def test_readme_is_a_short_front_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES} (details go to docs/)"


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_exists_and_links_back(page):
    path = DOCS / f"{page}.md"
    assert path.is_file(), f"docs/{page}.md is missing"
    head = "\n".join(path.read_text(encoding="utf-8").splitlines()[:6])
    assert "](../README.md" in head, f"docs/{page}.md: its opening lines should link back to the README"


@pytest.mark.parametrize("path, number, target", list(_links()))
def test_relative_link_resolves(path, number, target):
    where = f"{_rel(path)}:{number}: link '{target}'"
    file_part, _, anchor = target.partition("#")
    resolved = (path.parent / file_part).resolve() if file_part else path
    assert resolved.exists(), f"{where}: {file_part} does not exist"
    if anchor and resolved.suffix == ".md":
        assert anchor in anchors(resolved), (
            f"{where}: no heading of {_rel(resolved)} has the anchor #{anchor} "
            f"(anchors: {', '.join(sorted(anchors(resolved)))})")


@pytest.mark.parametrize("command", list(_commands()))
def test_documented_command_composes(command: Command):
    where = f"{_rel(command.path)}:{command.number}: `{command.text}`"
    for job in _jobs(command.overrides, command.multirun):
        try:
            make_cfg(job, command.config_name)  # what `--cfg job` would print for this job
        except Exception as e:  # Hydra's own errors: an unknown group option, bad syntax, a missing key
            pytest.fail(f"{where}\njob `{' '.join(job)}` does not compose: {type(e).__name__}: {e}")
    try:
        # the entry point's own pre-flight check of its argv: unknown keys, and every value of every job
        check_overrides(command.overrides, command.config_name)
    except ErnieLabError as e:
        pytest.fail(f"{where}\nrefused by the project's check: {e}")


def test_the_documented_commands_were_found():
    """A guard against a parser that silently finds nothing: the README's own sweep is among the commands."""
    found = [p.values[0] for p in _commands()]
    assert any(c.path == README and c.multirun and "precision=fp16,int8" in c.overrides for c in found)
    assert {c.config_name for c in found} == {"config", "pipeline", "report"}


def _table_after(text: str, marker: str) -> str:
    """The markdown table that starts on the first line after `marker` (a heading or a comment)."""
    lines = text[text.index(marker):].splitlines()[1:]
    while lines and not lines[0].startswith("|"):
        lines.pop(0)
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append(line)
    return "\n".join(table)


def test_readme_converged_table_is_the_published_one():
    """The README's converged table is copied from the published report; a task published since must reach it."""
    report = (PROJECT_ROOT / "results" / "converged" / "report.md").read_text(encoding="utf-8")
    published = _table_after(report, "## Beside the seed's CPU table")
    shown = _table_after(README.read_text(encoding="utf-8"), "<!-- copied from results/converged/report.md")
    assert published.count("\n") >= 5, "results/converged/report.md lost its table beside the seed's"
    assert shown == published, ("README.md's converged table differs from results/converged/report.md's "
                                "'Beside the seed's CPU table': copy the report's table into the README")
