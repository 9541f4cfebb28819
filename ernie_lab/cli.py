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
from ernie_lab.errors import ConfigError, ErnieLabError

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


# Hydra flags that print something (the config, help) instead of running a job: nothing to refuse then.
INSPECTING = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--version"}


def prepare_cli(argv: list[str] | None = None, config_name: str = "config", stage: str | None = None) -> None:
    """Before Hydra starts (so before any MLflow run): SIGTERM/SIGINT become a stop that closes open runs as
    KILLED, and the command line is checked: unknown keys and invalid values fail here, naming what is valid, and
    every job of a sweep is checked for what `stage` needs on this machine (`refusals`)."""
    signals.install_for_process()
    from ernie_lab.config import check_overrides

    argv = sys.argv[1:] if argv is None else argv
    try:
        check_overrides(argv, config_name)
    except ErnieLabError as exc:
        fail(str(exc))
    if stage is not None and not INSPECTING.intersection(a.split("=", 1)[0] for a in argv):
        lines = refusals(argv, config_name, stage)
        if lines:
            from ernie_lab.reporting import console

            for line in lines:
                console.print(f"[bold red]error:[/] {line}", soft_wrap=True, highlight=False)
            sys.exit(2)


def refusals(argv: list[str], config_name: str, stage: str) -> list[str]:
    """One line per reason that jobs of this command line cannot run here, naming the jobs, the reason and what
    to run instead: a precision this machine lacks (runtime=auto finds no engine for it, or the chosen runtime
    cannot run it), an export or checkpoint nobody made. Empty when every job can start."""
    from ernie_lab.config import compose_config, sweep_jobs, swept_part

    jobs = sweep_jobs(argv)
    reasons: dict[str, list[str]] = {}
    for job in jobs:
        overrides = [o for o in job if not o.startswith("hydra")]
        try:
            cfg = compose_config(config_name, overrides)
            check_job(cfg, stage)
        except ErnieLabError as exc:
            reasons.setdefault(str(exc), []).append(swept_part(job, argv))
        except Exception:  # Hydra refuses the overrides: its own message, when the job runs, names the problem
            continue
    lines = []
    for reason, names in reasons.items():
        if len(jobs) == 1:
            lines.append(reason)
        else:
            lines.append(f"{len(names)} of {len(jobs)} jobs cannot run here ({'; '.join(names)}): {reason}")
    return lines


def check_job(cfg: DictConfig, stage: str) -> None:
    """What a stage needs before it starts, short of running it: a GPU where the runtime is one (the checks that
    import paddle stay in the job), a precision this CPU can run, the export an infer run reads, the checkpoint
    compress reads."""
    from ernie_lab import artifacts, runtime

    check_config(cfg)
    if cfg.runtime.device == "gpu":
        gap = runtime.gpu_presence_gap()
        if gap:
            raise ConfigError(gap)
    if stage == "infer":
        if cfg.runtime.device == "cpu":
            runtime.check_precision(cfg.runtime, cfg.precision.name)
        artifacts.resolve_export(cfg)
    elif stage == "compress":
        if not (artifacts.finetuned_dir(cfg) / "config.json").is_file():
            from ernie_lab.errors import MissingArtifactError

            raise MissingArtifactError(f"no fine-tuned checkpoint at {artifacts.finetuned_dir(cfg)}; make it with "
                                       f"`{artifacts.make_command('train.py', cfg)}`")


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


try:
    from hydra.errors import CompactHydraException
except ImportError:  # pragma: no cover - hydra is a hard dependency
    CompactHydraException = Exception


class JobFailed(CompactHydraException):
    """An ErnieLabError that failed one job of a multirun: Hydra prints its message alone, no traceback."""


@contextmanager
def command_errors(stage: str | None = None) -> Iterator[None]:
    """An ErnieLabError becomes one line and exit status 2; in a multirun the job fails with that line (JobFailed),
    so that Hydra records it as failed, runs the rest of the sweep and prints no traceback for it."""
    try:
        yield
    except ErnieLabError as exc:
        prefix = f"error ({stage})" if stage else "error"
        if in_multirun():
            raise JobFailed(f"{prefix}: {exc}") from None
        fail(str(exc), prefix)


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


def job_config(cfg: DictConfig) -> DictConfig:
    """The Hydra job's config with runtime=auto replaced by the engine it picks for the job's precision."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from ernie_lab.config import resolve_runtime

    hc = HydraConfig.get()
    return resolve_runtime(cfg, list(hc.overrides.task),
                           lambda overrides: compose(config_name=hc.job.config_name, overrides=overrides))


def run_stage(stage: str, cfg: DictConfig) -> Any:
    """One stage inside a tracked run, after the runtime is set up."""
    from ernie_lab import runtime
    from ernie_lab.tracking import UntrackedRun, tracked_run

    rank, _ = runtime.data_parallel_rank()
    with command_errors(stage):
        cfg = job_config(cfg)
        check_config(cfg)  # again in the job: values only Hydra can resolve (`${hydra:job.num}`) are known now
        # under paddle.distributed.launch only rank 0 records the run
        with tracked_run(cfg, stage) if rank == 0 else nullcontext(UntrackedRun()) as run:
            info = prepare_runtime(cfg, stage)
            run.log_params({f"runtime_info.{k}": v for k, v in info.items()})
            return call_stage(stage, cfg, run)
