"""Writes killed with SIGKILL at the worst moments leave the complete old content or the complete new content
(or, only where the system cannot swap directories atomically, nothing), never a torn directory or file;
readers never take a writer's hidden leftovers for an export; the next write removes a dead writer's leftovers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ernie_lab import artifacts
from ernie_lab.errors import MissingArtifactError
from tests.conftest import isolated_overrides, make_cfg

# A child that writes an export (a big weights file, then its manifest) through atomic_dir. `where` says when
# it gets killed: "body" while the weights are half written, "after_swap" when the new export has taken the
# old one's place but the old one is not removed yet, "between_renames" on a system without an atomic swap.
WRITER = r"""
import os, shutil, signal, sys, time
from pathlib import Path
from ernie_lab import artifacts

final, where = Path(sys.argv[1]), sys.argv[2]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if where == "after_swap":
    shutil.rmtree = die
if where == "between_renames":
    artifacts.exchange = lambda a, b: False
    real_replace = os.replace
    def replace_then_die(src, dst):
        real_replace(src, dst)
        die()
    os.replace = replace_then_die
with artifacts.atomic_dir(final) as tmp:
    with open(tmp / "model.pdiparams", "wb") as fh:
        for i in range(20):
            fh.write(b"new!" * 4096)
            fh.flush()
            if i == 10 and where == "body":
                print("half written", flush=True)
                time.sleep(60)  # killed here
    (tmp / "manifest.json").write_text('{"version": "new", "files": ["model.pdiparams"]}')
"""

OLD_WEIGHTS = b"old!" * 4096 * 20


def write_old(final):
    with artifacts.atomic_dir(final) as tmp:
        (tmp / "model.pdiparams").write_bytes(OLD_WEIGHTS)
        artifacts.write_json_atomic(tmp / "manifest.json", {"version": "old", "files": ["model.pdiparams"]})


def run_and_kill(script: str, *args: str, wait_for: str | None) -> int:
    """Start a child writer, SIGKILL it once it prints `wait_for` (None: it kills itself), reap it."""
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.strip() == wait_for:
            child.send_signal(signal.SIGKILL)
            break
    assert child.wait(timeout=60) == -signal.SIGKILL
    return child.pid


def leftovers(final):
    return sorted(p.name for p in final.parent.iterdir() if p.name != final.name)


@pytest.mark.parametrize(("where", "after_kill"), [
    ("body", "old"),
    ("after_swap", "new"),
    ("between_renames", None),  # no atomic swap available: missing for a moment, never torn
])
def test_a_killed_export_is_old_or_new_never_torn(tmp_path, monkeypatch, where, after_kill):
    final = tmp_path / "export" / "none"
    write_old(final)
    pid = run_and_kill(WRITER, str(final), where, wait_for="half written" if where == "body" else None)

    if after_kill is None:
        assert not final.exists()
        with pytest.raises(MissingArtifactError, match="no exported model"):
            artifacts.read_manifest(final, "python compress.py")
    else:
        manifest = artifacts.read_manifest(final, "python compress.py")
        assert manifest["version"] == after_kill
        weights = (final / "model.pdiparams").read_bytes()
        assert weights == (OLD_WEIGHTS if after_kill == "old" else b"new!" * 4096 * 20)
    assert leftovers(final) and all(name.startswith(".none.") and str(pid) in name for name in leftovers(final))

    monkeypatch.setattr(artifacts, "PROCESS_STARTED", time.time() + 1)  # as seen by a later process
    with artifacts.atomic_dir(final) as tmp:
        (tmp / "manifest.json").write_text('{"version": "next", "files": []}')
    assert leftovers(final) == []  # the dead writer's leftovers are gone
    assert artifacts.read_manifest(final, "python compress.py")["version"] == "next"


def test_a_half_written_first_export_is_never_picked_up(tmp_path):
    from ernie_lab.artifacts import resolve_export

    cfg = make_cfg(isolated_overrides(tmp_path) + ["model=tiny", "strategy=none", "precision=fp32"])
    final = artifacts.export_dir(cfg, "none")
    run_and_kill(WRITER, str(final), "body", wait_for="half written")
    assert not final.exists() and leftovers(final)  # only the hidden, half-written sibling
    with pytest.raises(MissingArtifactError, match=f"no exported model at {final}.*python compress.py"):
        resolve_export(cfg)


JSON_WRITER = r"""
import sys, time
from pathlib import Path
from ernie_lab import artifacts

def slow_write_text(self, text, encoding=None):
    with open(self, "w", encoding=encoding) as fh:
        fh.write(text[: len(text) // 2])
        fh.flush()
        print("half written", flush=True)
        time.sleep(60)
Path.write_text = slow_write_text
artifacts.write_json_atomic(Path(sys.argv[1]), {"version": "new", "payload": "x" * 100000})
"""


def test_a_killed_json_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    artifacts.write_json_atomic(path, {"version": "old"})
    pid = run_and_kill(JSON_WRITER, str(path), wait_for="half written")
    assert json.loads(path.read_text()) == {"version": "old"}
    assert leftovers(path) == [f".manifest.json.tmp-{pid}"]
    monkeypatch.setattr(artifacts, "PROCESS_STARTED", time.time() + 1)
    artifacts.write_json_atomic(path, {"version": "next"})
    assert leftovers(path) == [] and json.loads(path.read_text()) == {"version": "next"}


def test_stale_cleanup_touches_only_dead_writers_own_leftovers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getpid()
    target = tmp_path / "export"
    names = {
        f".export.tmp-{dead_pid}-abc": True,  # a killed atomic_dir
        f".export.old-{dead_pid}": True,  # killed between the two renames
        f".export.tmp-{live_pid}-abc": False,  # a writer that is still running
        f".exports.tmp-{dead_pid}-abc": False,  # another target's
        f"export.tmp-{dead_pid}": False,  # not hidden: not ours
        ".export.tmp-notapid": False,
        "export": False,
    }
    for name in names:
        (tmp_path / name).mkdir()
    removed = artifacts.remove_stale_siblings(target, before=time.time() + 1)
    assert sorted(p.name for p in removed) == sorted(n for n, stale in names.items() if stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, stale in names.items() if not stale)
    # made after this process started: kept, whoever made it (it may be a writer on another machine)
    (tmp_path / f".export.tmp-{dead_pid}-new").mkdir()
    assert artifacts.remove_stale_siblings(target) == []
