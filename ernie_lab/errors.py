"""Errors a user can act on. Entry scripts print these without a stack trace."""


class ErnieLabError(Exception):
    """Base class: the message alone tells the user what to change."""


class ConfigError(ErnieLabError):
    """A config value that is unknown, out of range or impossible on this machine."""


class DataError(ErnieLabError):
    """A data file that is missing or has a malformed line (the message names file and line)."""


class MissingArtifactError(ErnieLabError):
    """A checkpoint or exported model that has not been made yet (the message names the command that makes it)."""


def choice_error(key: str, value, choices) -> ConfigError:
    """The standard message for a value outside its set of valid choices."""
    listed = ", ".join(str(c) for c in choices)
    return ConfigError(f"{key}={value!r} is not valid; choose one of: {listed}")


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise choice_error(key, value, choices)


# What a user reads for an engine's name in a crash message and in the report's status cell.
ENGINE_TITLES = {"paddle": "Paddle Inference", "paddle-trt": "Paddle TensorRT", "paddle-gpu": "Paddle Inference GPU",
                 "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "numpy": "numpy"}


class EngineCrashed(ErnieLabError):
    """A child process running an engine (benchmark, calibration scoring, roofline probe) died without a Python
    error: killed by a signal (SIGSEGV, SIGABRT from `double free ...`) or exiting with a non-zero code. The message
    names the engine, precision, model, the signal or exit code and the last lines the child wrote to stderr;
    `tags` are what the failed MLflow run records about it (tracking.close_failed logs them)."""

    def __init__(self, engine: str, precision: str, model: str, exitcode: int, stderr_tail=(), runtime: str = "",
                 what: str = "benchmark"):
        import signal

        self.engine, self.precision, self.model, self.runtime, self.what = engine, precision, model, runtime, what
        self.exitcode = exitcode
        self.stderr_tail = [line for line in stderr_tail]
        try:
            self.signal = signal.Signals(-exitcode).name if exitcode < 0 else None
        except ValueError:
            self.signal = f"signal {-exitcode}"
        self.tags = {
            "engine": engine,
            **({"crash_signal": self.signal} if self.signal else {"crash_exit_code": str(exitcode)}),
            "crash_stderr": " | ".join(self.stderr_tail)[-2000:],
            "crash_status": self.status,
        }
        super().__init__(self._message())

    @property
    def cause(self) -> str:
        return self.signal or f"exit code {self.exitcode}"

    @property
    def status(self) -> str:
        """`crashed: SIGSEGV (OpenVINO bf16): double free or corruption (!prev)`, the report's cell for the run."""
        return crash_status(self.cause, self.engine, self.precision, self.stderr_tail[-1:] and self.stderr_tail[-1])

    def _message(self) -> str:
        how = f"was killed by {self.signal}" if self.signal else f"exited with code {self.exitcode}"
        if self.signal == "SIGKILL":
            how += " (out of memory? the kernel's OOM killer sends SIGKILL)"
        runtime = f", runtime={self.runtime}" if self.runtime and self.runtime != self.engine else ""
        said = " | ".join(self.stderr_tail) if self.stderr_tail else "(nothing)"
        return (f"the {self.what} process of engine {self.engine} (precision {self.precision}{runtime}, model "
                f"{self.model}) {how}; the last lines it wrote to stderr: {said}")

    def __reduce__(self):
        return type(self), (self.engine, self.precision, self.model, self.exitcode, self.stderr_tail, self.runtime,
                            self.what)


def crash_status(cause: str, engine: str, precision: str, last_line: str | None = None) -> str:
    title = ENGINE_TITLES.get(engine, engine)
    return f"crashed: {cause} ({title} {precision})" + (f": {last_line}" if last_line else "")
