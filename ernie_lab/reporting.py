"""Console output: progress bars and result tables (rich)."""
from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import Iterable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Off a terminal (CI logs, `| tee`), rich would wrap the result tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)


def progress() -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for row in rows:
        t.add_row(*(str(x) for x in row))
    return t


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """The same table as GitHub markdown."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@contextlib.contextmanager
def quiet_library(logger: str | None = None) -> Iterator[None]:
    """Silence a library's own chatter around a call: what it prints on stdout (progress bars) and what its logger
    (`None`: the root logger) says below ERROR about choices made here on purpose."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)
