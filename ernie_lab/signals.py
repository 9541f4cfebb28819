"""SIGTERM and SIGINT become one exception, `Stopped`, wherever the process is, so that every open MLflow run is
closed as KILLED (with where it stopped) and the process exits promptly.

Why more than `signal.signal`: importing paddle (and paddlenlp, which initialises more of paddle's core) replaces
the process's C-level SIGTERM handler with paddle's own, which prints `*** SIGTERM ... received` and aborts,
while Python still believes its handler is installed. An import hook therefore puts ours back after every
module of those packages is loaded, whichever code imports them first."""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
from importlib.abc import FileLoader
import os
import signal
import sys
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Packages whose import installs native signal handlers over ours.
NATIVE_HANDLER_PACKAGES = ("paddle", "paddlenlp", "paddleslim", "paddle2onnx", "onnxruntime")
# After the first signal, give the clean-up (closing runs, stopping children) this long before a hard exit.
GRACE_SECONDS = 30.0


class Stopped(SystemExit):
    """Raised in the main thread by SIGTERM or SIGINT. A SystemExit, so `except Exception` handlers let it through
    and the exit status is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum
        self.signame = signal.Signals(signum).name

    def __str__(self) -> str:
        return f"stopped by {self.signame}"


_received: list[int] = []
#: nesting depth of the sections a stop must not cut (native imports, tracking-store writes), and a stop that
#: arrived during one: paddle's import code swallows exceptions (a bare `except:` in paddle.base.core), and an
#: MLflow write cut mid-transaction leaves its SQLite session unusable, so the run could not be closed as KILLED.
#: The stop is raised once the outermost section is done.
_hold_depth = 0
_deferred: list[int] = []


def received() -> str | None:
    """The name of the stop signal this process got, if any (a sweep's end reports its parent run as KILLED)."""
    return signal.Signals(_received[0]).name if _received else None


def _stop_children() -> None:
    """Benchmark and calibration children run in processes of their own; they must not outlive the stop."""
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                child.terminate()
            except psutil.Error:
                pass
    except Exception:  # best effort: the stop itself must not fail here
        pass


def _hard_exit(signum: int) -> None:
    os._exit(128 + signum)


def _handle(signum: int, frame) -> None:
    if _received:  # already stopping: let the clean-up finish (the grace timer bounds it)
        return
    _received.append(signum)
    _stop_children()
    timer = threading.Timer(GRACE_SECONDS, _hard_exit, args=(signum,))
    timer.daemon = True
    timer.start()
    if _hold_depth:
        _deferred.append(signum)
        return
    raise Stopped(signum)


def as_stop(exc: BaseException) -> BaseException:
    """The stop behind `exc` once a stop has arrived, else `exc`. Libraries that catch what they call and raise
    their own error hide the stop: OmegaConf turns any error inside it into a ConfigKeyError, and a `finally` can
    fail on state the stop left half-done. The run would then be closed as FAILED and exit with status 1."""
    if not _received or isinstance(exc, Stopped):
        return exc
    stop = Stopped(_received[0]).with_traceback(exc.__traceback__)  # where the work was when it stopped
    stop.__cause__ = exc
    return stop


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A section a stop must not cut: a stop that arrives inside is raised when the outermost section ends."""
    global _hold_depth
    _hold_depth += 1
    try:
        yield
    finally:
        _hold_depth -= 1
    if _deferred and not _hold_depth:
        raise Stopped(_deferred.pop())


def install() -> None:
    """(Re-)install the stop handlers; a no-op outside the main thread, where Python cannot set them."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handle)


class _ReinstallAfterNativeImports(importlib.abc.MetaPathFinder):
    """Wraps the loader of every module of NATIVE_HANDLER_PACKAGES so that `install()` runs after it executes."""

    def __init__(self) -> None:
        self._finding = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] not in NATIVE_HANDLER_PACKAGES or getattr(self._finding, "busy", False):
            return None
        self._finding.busy = True
        try:  # the spec the other finders would give; this finder only wraps its loader
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._finding.busy = False
        loader = spec.loader
        if not isinstance(loader, (FileLoader, importlib.machinery.ExtensionFileLoader)):  # per-module loader instances only
            return spec
        original = loader.exec_module

        def exec_module(module):
            with held():
                try:
                    original(module)
                finally:
                    install()

        loader.exec_module = exec_module
        return spec


_hook = _ReinstallAfterNativeImports()


def install_for_process() -> None:
    """Stop handlers now and after every import that would replace them. Call once, first thing in a command."""
    install()
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
