"""MLflow, and nothing else, lives here: runs for every stage, parent runs for sweeps, FAILED runs with tracebacks.

The client API is used instead of mlflow's fluent `start_run` so that runs never leak between the jobs of a
multirun that share one process."""
from __future__ import annotations

import atexit
import json
import os
import platform
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from ernie_lab.config import flatten

PARENT_RUN_ENV = "ERNIE_LAB_PARENT_RUN_ID"
SWEEP_ID_ENV = "ERNIE_LAB_SWEEP_ID"


def _client(tracking_cfg: DictConfig):
    from mlflow.tracking import MlflowClient

    uri = tracking_cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def experiment_id(tracking_cfg: DictConfig) -> str:
    """Create the experiment once (before any parallel job would race to create it)."""
    client = _client(tracking_cfg)
    exp = client.get_experiment_by_name(tracking_cfg.experiment_name)
    if exp is not None:
        return exp.experiment_id
    location = tracking_cfg.artifact_location
    if location and "://" not in location:
        Path(location).mkdir(parents=True, exist_ok=True)
        location = Path(location).resolve().as_uri()
    try:
        return client.create_experiment(tracking_cfg.experiment_name, artifact_location=location)
    except Exception:  # created meanwhile by a concurrent job
        return client.get_experiment_by_name(tracking_cfg.experiment_name).experiment_id


class TrackedRun:
    """One MLflow run. Metric names keep their `group/name` form so the UI's charts line up."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_dict(self, data: dict, name: str) -> None:
        self.log_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), name)


def run_tags(cfg: DictConfig, stage: str) -> dict[str, str]:
    tags = {
        "stage": stage,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "model_init": cfg.model.init,
        "strategy": cfg.strategy.name,
        "runtime": cfg.runtime.name,
        "device": cfg.runtime.device,
        "host": platform.node(),
    }
    if stage == "infer":  # training and export are precision-agnostic; only a benchmark run has one
        tags["precision"] = cfg.precision.name
    if cfg.model.init == "random":
        tags["weights_note"] = "offline: randomly initialised weights with the real ERNIE 3.0 vocabulary (no pretraining)"
    if os.environ.get(SWEEP_ID_ENV):
        tags["sweep_id"] = os.environ[SWEEP_ID_ENV]
    return tags


@contextmanager
def tracked_run(cfg: DictConfig, stage: str, run_name: str | None = None,
                parent_run_id: str | None = None) -> Iterator[TrackedRun]:
    """A run with the flattened config as params and the resolved config as an artifact.

    If the body raises, the traceback is logged as `error.txt`, the run is marked FAILED and the error
    propagates (a multirun records the job as failed and goes on with the others)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = _client(cfg.tracking)
    exp_id = experiment_id(cfg.tracking)
    tags = run_tags(cfg, stage)
    tags[MLFLOW_RUN_NAME] = run_name or "-".join([stage, cfg.task.name, cfg.model.name, cfg.strategy.name, tags.get("precision", "")]).rstrip("-")
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags[MLFLOW_PARENT_RUN_ID] = parent
        tags["sweep_id"] = os.environ.get(SWEEP_ID_ENV, parent)
    run = client.create_run(exp_id, tags=tags)
    tracked = TrackedRun(client, run.info.run_id)
    try:
        resolved = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
        tracked.log_params(flatten(resolved))
        tracked.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        yield tracked
    except BaseException as exc:
        tracked.log_text("".join(traceback.format_exception(exc)), "error.txt")
        tracked.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))  # Ctrl-C, or SIGTERM via exit_on_sigterm
        client.set_terminated(tracked.run_id, "KILLED" if stopped else "FAILED")
        raise
    else:
        client.set_terminated(tracked.run_id, "FINISHED")


class UntrackedRun(TrackedRun):
    """Takes what a stage logs and drops it: the non-leading processes of a data-parallel training."""

    def __init__(self):
        super().__init__(client=None, run_id="")

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def set_tags(self, tags):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_text(self, text, name):
        pass


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler or `kill` stopping the job) into SystemExit, so open runs are closed as KILLED
    instead of staying RUNNING forever."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def start_parent_run(cfg: DictConfig, name: str, tags: dict[str, str] | None = None) -> TrackedRun:
    """A parent run that groups the child runs of one sweep or pipeline (selectable together in the UI)."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    client = _client(cfg.tracking)
    run = client.create_run(experiment_id(cfg.tracking), tags={MLFLOW_RUN_NAME: name, "stage": "sweep", **(tags or {})})
    client.set_tag(run.info.run_id, "sweep_id", run.info.run_id)
    return TrackedRun(client, run.info.run_id)


def attach_run(tracking_cfg: DictConfig, run_id: str) -> TrackedRun:
    """An existing run, to add artifacts to (e.g. a report on a finished sweep's parent run)."""
    return TrackedRun(_client(tracking_cfg), run_id)


def end_run(run: TrackedRun, failed: bool) -> None:
    run.client.set_terminated(run.run_id, "FAILED" if failed else "FINISHED")


def find_runs(tracking_cfg: DictConfig, filter_string: str) -> list:
    client = _client(tracking_cfg)
    exp = client.get_experiment_by_name(tracking_cfg.experiment_name)
    if exp is None:
        return []
    from mlflow.exceptions import MlflowException

    try:
        return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=10000)
    except MlflowException as exc:  # a user's filter (report.filter) that MLflow cannot parse
        from ernie_lab.errors import ConfigError

        raise ConfigError(f"MLflow cannot use the filter {filter_string!r}: {exc.message}") from None


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a hard dependency
    Callback = object


class SweepCallback(Callback):
    """Groups a Hydra multirun under one MLflow parent run and names the failed jobs when it ends.

    The parent run (and the experiment) is created once, before any job starts, and its id reaches the jobs
    through ERNIE_LAB_PARENT_RUN_ID / ERNIE_LAB_SWEEP_ID. Launchers that run jobs in other processes (joblib's
    loky workers, SLURM jobs through submitit) call `on_job_start`/`on_job_end` on a pickled copy of this
    callback there: the copy sets those variables from its own state and reports each job's outcome as a
    `job.<num>` tag of the parent run, which `_finish` reads back.

    Hydra's basic sweeper runs every job, then re-raises the first failure and skips `on_multirun_end`,
    so closing the parent run also happens at exit."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.parent: TrackedRun | None = None
        self.parent_id: str | None = None
        self.tracking: dict | None = None
        self.origin: tuple[str, int] | None = None  # (host, pid) of the process that started the sweep
        self.failed: list[str] = []
        self.done = 0

    def __getstate__(self) -> dict:
        # What a job in another process needs: the MLflow client and the sweep config stay here.
        return {**self.__dict__, "parent": None, "config": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        job = config.hydra.job.name
        # unresolved: an override may hold an interpolation that only a job can resolve (`${hydra:job.num}`)
        overrides = " ".join(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        self.config = config
        self.parent = start_parent_run(config, f"sweep-{job}", {"sweep_command": f"{job} {overrides}"[:5000]})
        self.parent_id = self.parent.run_id
        self.tracking = OmegaConf.to_container(config.tracking, resolve=True)
        self.origin = (platform.node(), os.getpid())
        os.environ[PARENT_RUN_ENV] = self.parent.run_id
        os.environ[SWEEP_ID_ENV] = self.parent.run_id
        atexit.register(self._finish)

    def _remote(self) -> bool:
        return self.parent_id is not None and (platform.node(), os.getpid()) != self.origin

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self._remote():  # a worker process: its runs are children of this sweep whatever its environment
            os.environ[PARENT_RUN_ENV] = self.parent_id
            os.environ[SWEEP_ID_ENV] = self.parent_id

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        line = None
        if job_return.status == JobStatus.FAILED:
            overrides = " ".join(job_return.overrides or [])
            line = f"#{config.hydra.job.num} {overrides}: {job_return._return_value}"
        if not self._remote():
            self.done += 1
            if line:
                self.failed.append(line)
            return
        status = f"FAILED {line}"[:5000] if line else "FINISHED"
        attach_run(OmegaConf.create(self.tracking), self.parent_id).set_tags({f"job.{config.hydra.job.num}": status})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish()

    def _collect_remote_jobs(self, parent: TrackedRun) -> None:
        """Outcomes reported by jobs that ran in other processes, and child runs that a dead process left open
        (a worker killed by the OOM killer or a scheduler): those are closed as KILLED and count as failed."""
        tags = parent.client.get_run(parent.run_id).data.tags
        reported = sorted((int(k[4:]), v) for k, v in tags.items() if k.startswith("job.") and k[4:].isdigit())
        self.done += len(reported)
        self.failed += [v[len("FAILED "):] for _, v in reported if v.startswith("FAILED ")]
        for run in find_runs(OmegaConf.create(self.tracking), f"tags.sweep_id = '{parent.run_id}'"):
            if run.info.run_id != parent.run_id and run.info.status == "RUNNING":
                parent.client.set_tag(run.info.run_id, "error", "the job's process ended without closing this run")
                parent.client.set_terminated(run.info.run_id, "KILLED")
                self.failed.append(f"run {run.info.run_name} ({run.info.run_id}): its process ended without closing it")

    def _finish(self) -> None:
        if self.parent is None:
            return
        parent, self.parent = self.parent, None
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEEP_ID_ENV, None)
        self._collect_remote_jobs(parent)
        if self.failed:
            parent.log_text("\n".join(self.failed), "failed_jobs.txt")
            from rich.console import Console

            console = Console(stderr=True)
            console.print(f"[bold red]{len(self.failed)} of {max(self.done, len(self.failed))} jobs failed:[/]")
            for line in self.failed:
                console.print(f"  [red]{line}[/]")
        self._closing_table(parent)
        end_run(parent, failed=bool(self.failed))

    def _closing_table(self, parent: TrackedRun) -> None:
        """Benchmark sweeps end with the report of their finished jobs (seed-shaped table, Pareto charts), written
        into the sweep directory and logged on the parent."""
        from ernie_lab.report import results_from_runs, write_report

        runs = find_runs(self.config.tracking, f"tags.sweep_id = '{parent.run_id}' and tags.stage = 'infer'")
        results = results_from_runs([r for r in runs if r.info.status == "FINISHED"])
        if results:
            write_report(results, self.config.model.name, Path(self.config.hydra.sweep.dir), parent)
