"""What the entry scripts share: checking the command line, preparing the runtime, and one tracked MLflow run
around each stage. Errors a user can fix print as one line; in a multirun they fail only their own job."""
from __future__ import annotations

import importlib
import sys
from contextlib import nullcontext
from typing import Any

from omegaconf import DictConfig

from ernie_lab.errors import ErnieLabError

# What each stage runs, as "module:function(cfg, run)"; imported only after the runtime is set up.
STAGES = {
    "train": "ernie_lab.training:finetune",
    "compress": "ernie_lab.compression.strategy:compress",
    "infer": "ernie_lab.inference.benchmark:infer",
}


def prepare_cli(argv: list[str] | None = None, config_name: str = "config") -> None:
    """Before Hydra starts: unknown config keys fail here with the valid keys listed, and SIGTERM is turned
    into an exit that closes open MLflow runs."""
    from ernie_lab.config import check_overrides
    from ernie_lab.reporting import console
    from ernie_lab.tracking import exit_on_sigterm

    exit_on_sigterm()

    try:
        check_overrides(sys.argv[1:] if argv is None else argv, config_name)
    except ErnieLabError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


def quiet_libraries() -> None:
    """Third-party deprecation chatter and PaddleNLP's INFO lines would bury the progress bars and tables."""
    import logging
    import warnings

    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("paddlenlp").setLevel(logging.WARNING)
    from paddlenlp.utils.log import logger

    logger.set_level("WARNING")


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def call_stage(stage: str, cfg: DictConfig, run) -> Any:
    module, func = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), func)(cfg, run)


def run_stage(stage: str, cfg: DictConfig) -> Any:
    """One stage inside a tracked run, after the runtime is set up."""
    from ernie_lab import runtime
    from ernie_lab.reporting import console
    from ernie_lab.tracking import UntrackedRun, exit_on_sigterm, tracked_run

    rank, _ = runtime.data_parallel_rank()
    try:
        # under paddle.distributed.launch only rank 0 records the run
        with tracked_run(cfg, stage) if rank == 0 else nullcontext(UntrackedRun()) as run:
            info = runtime.prepare(
                cfg.runtime,
                precision=cfg.precision.name if stage == "infer" else None,
                threads=cfg.train.threads if stage == "train" else None,
            )
            quiet_libraries()  # imports paddlenlp, hence paddle: only after the runtime is prepared
            exit_on_sigterm()  # again: importing paddle replaced our SIGTERM handler with its own
            run.log_params({f"runtime_info.{k}": v for k, v in info.items()})
            return call_stage(stage, cfg, run)
    except ErnieLabError as exc:
        console.print(f"[bold red]error ({stage}):[/] {exc}")
        if _in_multirun():
            raise  # Hydra records this job as failed and runs the rest of the sweep
        sys.exit(2)
