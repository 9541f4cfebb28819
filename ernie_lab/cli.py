"""The command layer's one wrapper, shared by train.py, compress.py, infer.py, `python -m ernie_lab.pipeline` and
`python -m ernie_lab.report`: the pre-flight check of the command line, stop signals, error mapping, runtime
preparation and one tracked MLflow run around each stage. Errors a user can fix print as one line and exit 2;
in a multirun they fail only their own job."""
from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

from omegaconf import DictConfig

from ernie_lab import signals
from ernie_lab.errors import ErnieLabError

# What each stage runs, as "module:function(cfg, run)"; imported only after the runtime is set up.
STAGES = {
    "train": "ernie_lab.training:finetune",
    "compress": "ernie_lab.compression.strategy:compress",
    "infer": "ernie_lab.inference.benchmark:infer",
}


def fail(message: str, prefix: str = "error") -> None:
    """A user-fixable error: one line, exit status 2."""
    from ernie_lab.reporting import console

    console.print(f"[bold red]{prefix}:[/] {message}", soft_wrap=True)
    sys.exit(2)


def prepare_cli(argv: list[str] | None = None, config_name: str = "config") -> None:
    """Before Hydra starts (so before any MLflow run): SIGTERM/SIGINT become a stop that closes open runs as
    KILLED, and the command line is checked: unknown keys and invalid values fail here, naming what is valid."""
    signals.install_for_process()
    from ernie_lab.config import check_overrides

    try:
        check_overrides(sys.argv[1:] if argv is None else argv, config_name)
    except ErnieLabError as exc:
        fail(str(exc))


def check_config(cfg: DictConfig) -> None:
    """Every value against the schema (types, ranges, choices), before any work or MLflow run."""
    from ernie_lab.schema import validate

    validate(cfg)


def quiet_libraries() -> None:
    """Third-party deprecation chatter and PaddleNLP's INFO lines would bury the progress bars and tables."""
    import logging
    import warnings

    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("paddlenlp").setLevel(logging.WARNING)
    from paddlenlp.utils.log import logger

    logger.set_level("WARNING")


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def command_errors(stage: str | None = None) -> Iterator[None]:
    """An ErnieLabError becomes one line and exit status 2; in a multirun it is re-raised, so that Hydra records
    the job as failed and runs the rest of the sweep."""
    try:
        yield
    except ErnieLabError as exc:
        if in_multirun():
            from ernie_lab.reporting import console

            console.print(f"[bold red]error ({stage}):[/] {exc}" if stage else f"[bold red]error:[/] {exc}")
            raise
        fail(str(exc), f"error ({stage})" if stage else "error")


def prepare_runtime(cfg: DictConfig, stage: str) -> dict:
    """Threads, denormals and precision checks before paddle starts; then paddle's chatter is silenced."""
    from ernie_lab import runtime

    info = runtime.prepare(
        cfg.runtime,
        precision=cfg.precision.name if stage == "infer" else None,
        threads=cfg.train.threads if stage in ("train", "pipeline") else None,
    )
    quiet_libraries()  # imports paddlenlp, hence paddle: only after the runtime is prepared
    return info


def call_stage(stage: str, cfg: DictConfig, run) -> Any:
    module, func = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), func)(cfg, run)


def run_stage(stage: str, cfg: DictConfig) -> Any:
    """One stage inside a tracked run, after the runtime is set up."""
    from ernie_lab import runtime
    from ernie_lab.tracking import UntrackedRun, tracked_run

    rank, _ = runtime.data_parallel_rank()
    with command_errors(stage):
        check_config(cfg)  # again in the job: values only Hydra can resolve (`${hydra:job.num}`) are known now
        # under paddle.distributed.launch only rank 0 records the run
        with tracked_run(cfg, stage) if rank == 0 else nullcontext(UntrackedRun()) as run:
            info = prepare_runtime(cfg, stage)
            run.log_params({f"runtime_info.{k}": v for k, v in info.items()})
            return call_stage(stage, cfg, run)
