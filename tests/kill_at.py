"""Run `python -m ernie_lab.pipeline ARGS` and SIGKILL it at a chosen point, as a power cut or an OOM kill would:

    python tests/kill_at.py train_state ARGS...        # right after training saves its first resumable state
    python tests/kill_at.py distill_state ARGS...      # right after DynaBERT's distillation saves its first one
    python tests/kill_at.py record:<stage key> ARGS... # right after the pipeline records that stage as finished

The pipeline code is not changed: the point is found by wrapping the function that reaches it."""
from __future__ import annotations

import os
import runpy
import signal
import sys


def kill_after(owner, name: str, when=lambda *args: True) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        if when(*args):
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, wrapped)


def main() -> None:
    point, args = sys.argv[1], sys.argv[2:]
    if point == "train_state":
        from ernie_lab import training

        kill_after(training.FineTuning, "save_state")
    elif point == "distill_state":
        from ernie_lab import training

        kill_after(training, "save_train_state", lambda state_dir, *rest: state_dir.name == "dynabert_state")
    elif point.startswith("record:"):
        from ernie_lab import stages

        kill_after(stages, "write_record", lambda stage, key, *rest: key == point.split(":", 1)[1])
    else:
        raise SystemExit(f"unknown kill point {point!r}; choose train_state, distill_state or record:<stage key>")
    sys.argv = ["ernie_lab.pipeline", *args]
    # as `python -m ernie_lab.pipeline` runs it (Hydra finds conf/ beside the file it runs as __main__)
    runpy.run_module("ernie_lab.pipeline", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
