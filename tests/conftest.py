"""Shared test helpers: configs composed exactly as the entry scripts compose them, with every output
(artifacts, MLflow store, Hydra runs) redirected into a temporary directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ernie_lab.config import PROJECT_ROOT, compose_config

DATA_DIR = Path(os.environ.get("ERNIE_LAB_DATA", PROJECT_ROOT.parent / "shared" / "data"))


def isolated_overrides(tmp: Path) -> list[str]:
    return [
        f"paths.artifacts_dir={tmp / 'artifacts'}",
        f"paths.output_dir={tmp / 'outputs'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_location={tmp / 'mlartifacts'}",
    ]


# The entry scripts start from the main job's experiment (quickstart) and runtime=auto; tests start from each task's
# own recipe on Paddle Inference. A test's own experiment= or runtime= comes later and wins.
SCRIPT_BASE = ["experiment=none", "runtime=cpu"]


def make_cfg(overrides: list[str], config_name: str = "config"):
    """As a job of `config_name` composes it (runtime=auto resolved), from SCRIPT_BASE for the entry scripts."""
    return compose_config(config_name, [*(SCRIPT_BASE if config_name == "config" else []), *overrides])


@pytest.fixture(scope="session")
def tokenizer():
    """The real ERNIE 3.0 vocabulary, as every offline run uses it."""
    from ernie_lab.modeling import build_tokenizer

    return build_tokenizer(make_cfg(["model=tiny"]).model)


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(*overrides: str, config_name: str = "config"):
        return make_cfg(isolated_overrides(tmp_path) + list(overrides), config_name)

    return factory


def run_stage(cfg, stage: str, body):
    """A stage body (finetune, compress, infer) inside a tracked MLflow run, as the entry scripts run it."""
    from ernie_lab import runtime
    from ernie_lab.tracking import tracked_run

    runtime.prepare(cfg.runtime)
    with tracked_run(cfg, stage) as run:
        return body(cfg, run)


def run_script(script: str, *args: str, tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an entry script the way a user does, with outputs redirected into `tmp`."""
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) must come before any override
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, str(PROJECT_ROOT / script), *flags, *SCRIPT_BASE, *overrides, *isolated_overrides(tmp)]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


class RecordingRun:
    """Stands in for an MLflow run where a test only needs what a stage logged."""

    def __init__(self):
        self.params, self.metrics, self.files = {}, {}, {}

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_dict(self, data, name):
        self.files[name] = data

    def log_text(self, text, name):
        self.files[name] = text

    def log_artifact(self, path, artifact_path=None):
        self.files[str(path)] = path

    def set_tags(self, tags):
        pass


# A tiny TNEWS model trained and exported once per peer-engine test module (ONNX Runtime, OpenVINO).
PEER_TINY = [
    "model=tiny",
    "task.data.limit.train=256",
    "task.data.limit.eval=250",  # not a multiple of 32: the last batch is smaller
    "task.data.heldout_size=64",
    "train.epochs=6",
    "train.batch_size=16",
    "train.learning_rate=3e-3",
    "quantize.batch_size=8",
    "quantize.batch_nums=4",
    "benchmark.warmup_batches=1",
    "benchmark.warmup_seconds=0",
    "benchmark.passes=1",
]


def peer_cfg(workdir: Path, *extra: str):
    return make_cfg(isolated_overrides(workdir) + PEER_TINY + list(extra))


def export_float(workdir: Path):
    from ernie_lab.compression.strategy import compress

    return run_stage(peer_cfg(workdir, "strategy=none"), "compress", compress)


def train_and_export_float(workdir: Path) -> Path:
    from ernie_lab import artifacts
    from ernie_lab.training import finetune

    run_stage(peer_cfg(workdir), "train", finetune)
    export_float(workdir)
    return artifacts.export_dir(peer_cfg(workdir), "none")


def task_for(cfg):
    from ernie_lab.modeling import build_tokenizer
    from ernie_lab.tasks import build_task

    return build_task(cfg.task, build_tokenizer(cfg.model))


def peer_dev_batches(workdir: Path) -> list[dict]:
    """The peer tests' dev set (250 titles) as collated batches of 32, the last one smaller."""
    task = task_for(peer_cfg(workdir))
    features = task.featurize(task.load("eval"), training=False)
    return [task.collate(features[i : i + 32]) for i in range(0, len(features), 32)]


def isolated_logits(model_dir: Path, runtime_cfg, precision: str, batches: list[dict]):
    """The first output of every batch, run in an engine process of its own, as the benchmark runs it."""
    import numpy as np
    from omegaconf import OmegaConf

    from ernie_lab.inference.engine import measure_isolated

    runtime = OmegaConf.to_container(runtime_cfg, resolve=True)
    return np.concatenate([o[0] for o in measure_isolated(model_dir, runtime, precision, batches, 0, 1)["outputs"]])
