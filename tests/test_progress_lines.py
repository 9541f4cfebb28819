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


def test_time_left_leaves_out_a_stop_but_not_a_slow_evaluation(monkeypatch):
    """A run paused with kill -STOP (no CPU time spent) must not read as a slow run afterwards; an evaluation
    between two steps (CPU busy) is real time and stays in the rate."""
    from ernie_lab import reporting

    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(reporting.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(reporting, "_cpu_seconds", lambda: clock["cpu"])
    out = io.StringIO()
    with progress(output=Console(file=out, force_terminal=False, width=200), every_s=0) as bar:
        job = bar.add_task("train", total=10, info="")
        for wall, cpu in [(1, 1), (2, 2),  # two 1-second steps
                          (1002, 2.5),  # a step, then 1000 s stopped: 999.5 s without CPU time
                          (1062, 122.5)]:  # a 60-second evaluation on two threads, then a step
            clock.update(wall=wall, cpu=cpu)
            bar.advance(job)
    left = [line.split("about ")[1].split(" left")[0] for line in out.getvalue().splitlines() if "left" in line]
    # 9 and 8 steps at 1 s; then 3 steps in 2.5 s of running time: 7 / 1.2; then 4 steps in 62.5 s: 6 / 0.064
    assert left == ["0:00:09", "0:00:08", "0:00:05", "0:01:33"]


def test_cpu_seconds_count_a_child_process_that_ended():
    import subprocess
    import sys

    from ernie_lab.reporting import _cpu_seconds

    before = _cpu_seconds()
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    assert _cpu_seconds() - before > 0.1  # the child's time, reaped by run(), though this process only waited
