"""Off a terminal (a run logging to a file), the progress bars say how far they are in plain lines."""
import io

from rich.console import Console

from ernie_lab.reporting import progress


def run_bar(every_s: float, terminal: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200)
    with progress(output=console, every_s=every_s) as bar:
        job = bar.add_task("train", total=4, completed=1, info="")  # a resumed run starts part-way
        for step in range(3):
            bar.update(job, info=f"loss {2.0 - step:.4f}")
            bar.advance(job)
    return out.getvalue()


def test_every_advance_prints_a_line_when_the_interval_is_zero():
    text = run_bar(every_s=0, terminal=False)
    lines = [line for line in text.splitlines() if line.startswith("train ")]
    assert lines[0].startswith("train 2/4 (50%) elapsed 0:00:0") and lines[0].endswith("loss 2.0000")
    assert lines[-1].startswith("train 4/4 (100%)") and lines[-1].endswith("loss 0.0000")
    assert sum("4/4" in line for line in lines) == 1  # the finished bar is said once, not again on exit
    assert all(", about 0:00:00 left, " in line for line in lines[:-1]) and " left" not in lines[-1]


def test_a_long_interval_prints_only_the_finished_bar():
    lines = [line for line in run_bar(every_s=3600, terminal=False).splitlines() if line.startswith("train ")]
    assert len(lines) == 1 and lines[0].startswith("train 4/4 (100%)")


def test_a_terminal_gets_rich_bar_and_no_plain_lines():
    text = run_bar(every_s=0, terminal=True)
    assert "train 2/4 (50%)" not in text and "4/4" in text  # the live bar's own M/N column
