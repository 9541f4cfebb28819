"""Console output: progress bars and result tables (rich)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from typing import Iterable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Off a terminal (CI logs, `| tee`), rich would wrap the result tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)


# Off a terminal rich draws a bar only when it ends: a run logging to a file (`nohup ... > log`) would show nothing for
# hours, so there a line says how far each bar is, at most this often.
PLAIN_PROGRESS_EVERY_S = 60.0
# An interval between two moves of a bar longer than this, in which the process got less than this share of one
# core, is time it was stopped (kill -STOP), left out of the rate that gives the time left.
STOPPED_MIN_S = 5.0
STOPPED_CPU_SHARE = 0.05


class _Progress(Progress):
    """rich's Progress that, when its console is not a terminal, draws no bar but prints `description done/total
    (pct) elapsed remaining info` lines: every `every_s` seconds per bar, and once when a bar completes."""

    def __init__(self, *columns, console: Console, every_s: float, **kwargs) -> None:
        self.plain = not console.is_terminal
        super().__init__(*columns, console=console, disable=self.plain, **kwargs)
        self.every_s = every_s
        self._last_line: dict = {}
        self._started: dict = {}  # task -> (time, completed) when added: a resumed bar starts part-way
        self._clocks: dict = {}  # task -> [wall, cpu] at its last move
        self._stopped: dict = {}  # task -> wall seconds the process was stopped (SIGSTOP) while the bar ran

    def add_task(self, *args, **kwargs):
        task_id = super().add_task(*args, **kwargs)
        now = time.monotonic()
        self._last_line[task_id] = now
        self._started[task_id] = (now, self._tasks[task_id].completed)
        self._clocks[task_id] = [now, _cpu_seconds()]
        self._stopped[task_id] = 0.0
        return task_id

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._moved(task_id)

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if "completed" in kwargs or "advance" in kwargs:
            self._moved(task_id)

    def _moved(self, task_id) -> None:
        wall, cpu = time.monotonic(), _cpu_seconds()
        last_wall, last_cpu = self._clocks[task_id]
        self._clocks[task_id] = [wall, cpu]
        # A stopped process spends no CPU time; a working one (a step, an evaluation) spends at least about its
        # wall time. An interval nearly without CPU time was a stop, and counting it would inflate the time left.
        if wall - last_wall > STOPPED_MIN_S and cpu - last_cpu < STOPPED_CPU_SHARE * (wall - last_wall):
            self._stopped[task_id] += (wall - last_wall) - (cpu - last_cpu)
        self._plain_line(task_id)

    def _plain_line(self, task_id) -> None:
        if not self.plain:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        if now - self._last_line[task_id] < self.every_s and not task.finished:
            return
        if task.finished and self._last_line[task_id] == float("inf"):  # said already
            return
        self._last_line[task_id] = float("inf") if task.finished else now
        # from the bar's whole life, not rich's 30-second window (empty after a pause: a SIGSTOP, a slow evaluation),
        # less the time the process was stopped
        since, done_then = self._started[task_id]
        rate = (task.completed - done_then) / max(now - since - self._stopped[task_id], 1e-9)
        remaining = (task.total - task.completed) / rate if rate > 0 and task.total is not None else None
        done = f"{task.completed:g}" if task.total is None else \
            f"{task.completed:g}/{task.total:g} ({task.percentage:.0f}%)"
        line = (f"{task.description} {done} "
                f"elapsed {_clock(task.elapsed)}" + ("" if remaining is None or task.finished
                                                      else f", about {_clock(remaining)} left"))
        info = task.fields.get("info")
        self.console.print(line + (f", {info}" if info else ""), markup=False, highlight=False)


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that ended (a step benchmark's child, an engine process)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _clock(seconds: float | None) -> str:
    seconds = int(seconds or 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress(output: Console | None = None, every_s: float | None = None) -> Progress:
    return _Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=output or console,
        transient=False,
        every_s=PLAIN_PROGRESS_EVERY_S if every_s is None else every_s,
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
