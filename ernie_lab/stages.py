"""Stage records: what a finished pipeline stage made, from which settings and inputs, so that running the same
pipeline command again continues where it stopped instead of starting over.

    <artifacts_dir>/<model>/<init>/<task>/stages/<stage key>.json

A record holds the stage's fingerprint (a hash of the config sections the stage reads and of the digests of the
artifacts it reads), the digests of what it wrote, its result, its MLflow run and how long it took. A stage is
reused when its record's fingerprint matches the one its config and inputs give now and its outputs are still
the ones it wrote; otherwise it runs again (a training then resumes from its saved state, ernie_lab.training).
Digests are of the small files every writer replaces last and atomically (a checkpoint's training_state.json, an
export's manifest.json, a predictions file), each holding a creation time, so a rebuilt artifact never passes for
the old one.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ernie_lab import artifacts
from ernie_lab.config import flatten
from ernie_lab.training import NOT_IN_FINGERPRINT, finished_training

RECORD_DIR = "stages"
TRAINING_STATE = "training_state.json"
# The config sections each stage reads; a change anywhere else (tracking, paths, other stages' settings) leaves
# its record valid. Keys that change nothing the stage computes are dropped (NOT_FINGERPRINTED).
SECTIONS = {
    "train": ("seed", "task", "model", "train"),
    "compress": ("seed", "task", "model", "strategy", "prune", "quantize"),
    "infer": ("seed", "task", "model", "strategy", "precision", "runtime", "benchmark", "quantize"),
}
NOT_FINGERPRINTED = (*(f"train.{key}" for key in NOT_IN_FINGERPRINT),
                     *(f"prune.train.{key}" for key in ("log_every_steps", "save_every_steps", "resume")))


@dataclass(frozen=True)
class Reuse:
    """A finished stage found again: its record, and what to say about it."""
    record: dict

    @property
    def result(self):
        return self.record["result"]

    @property
    def minutes(self) -> float:
        return float(self.record.get("minutes", 0.0))

    def describe(self) -> str:
        return (f"{self.record['key']} finished {self.record['finished_at']} "
                f"(run {self.record.get('run_id') or '-'}, {self.minutes:.1f} min)")


def stage_key(stage: str, extra: list[str]) -> str:
    """A file-safe name for one stage of one task: `train`, `compress-dynabert`, `infer-none-int8-runtime=openvino`."""
    parts = [stage, *(e.split("=", 1)[1] if e.split("=", 1)[0] in ("strategy", "precision") else e
                      for e in extra if not e.startswith("task="))]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join(parts))


def record_path(cfg: DictConfig, key: str) -> Path:
    return artifacts.task_dir(cfg) / RECORD_DIR / f"{key}.json"


def digest(path: Path) -> str | None:
    """sha256 of a file, None when it is missing."""
    return artifacts.sha256_file(path) if path.is_file() else None


def settings(stage: str, cfg: DictConfig) -> dict:
    """The flattened, resolved config sections `stage` reads."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    picked = {section: resolved.get(section) for section in SECTIONS[stage]}
    return {k: v for k, v in flatten(picked).items() if k not in NOT_FINGERPRINTED}


def input_files(stage: str, cfg: DictConfig) -> dict[str, Path]:
    """The files whose digests stand for what `stage` reads (the fine-tuned checkpoint, the export)."""
    if stage == "compress":
        return {"finetuned": artifacts.finetuned_dir(cfg) / TRAINING_STATE}
    if stage == "infer":
        directory = _export_read(cfg)
        return {"export": directory / artifacts.MANIFEST} if directory else {}
    return {}


def output_files(stage: str, cfg: DictConfig, result) -> dict[str, Path]:
    """The files that stand for what `stage` wrote."""
    if stage == "train":
        return {"finetuned": artifacts.finetuned_dir(cfg) / TRAINING_STATE}
    if stage == "compress":
        return {"export": artifacts.export_dir(cfg, cfg.strategy.name) / artifacts.MANIFEST}
    return {"predictions": Path(result["predictions"])}


def _export_read(cfg: DictConfig) -> Path | None:
    from ernie_lab.errors import ErnieLabError

    try:
        return artifacts.resolve_export(cfg)[0]
    except ErnieLabError:  # not made yet: nothing to reuse
        return None


def machine() -> dict:
    from ernie_lab import runtime

    return {"cpu": runtime.cpu_model(), "flags": sorted(runtime.cpu_flag_set()), "gpu": runtime.gpu_presence_gap()}


def fingerprint(stage: str, cfg: DictConfig) -> str | None:
    """The hash a record of `stage` must carry to be reused; None while an input is missing."""
    inputs = {}
    for name, path in input_files(stage, cfg).items():
        inputs[name] = digest(path)
        if inputs[name] is None:
            return None
    if stage == "infer" and not inputs:
        return None
    described = {"stage": stage, "settings": settings(stage, cfg), "inputs": inputs}
    if stage == "infer":  # speed belongs to a machine: a copy of the artifacts on another CPU measures again
        from ernie_lab.tasks import TASKS

        described["machine"] = machine()
        revision = TASKS[cfg.task.name].output_revision
        if revision != 1:  # absent at 1, so the records from before revisions existed stay valid
            described["output_revision"] = revision
    return artifacts.json_sha256(described)


def task_fingerprint(train_cfg: DictConfig, compress_cfgs: list[DictConfig], variants: list,
                     second_phase_cfg: DictConfig | None = None) -> str:
    """The hash a published task record (ernie_lab.publish) must carry to stand in for all of a task's stages: the
    settings of its training (and of its second phase, where it has one) and of every compression asked for, its
    benchmark settings and the variants asked for. Not the machine, nor the digests of local artifacts: a record
    carried in git to a new machine, without them, still stands, with the rows its own machine ran."""
    root = Path(os.path.normpath(str(train_cfg.paths.root_dir)))
    described = {
        "train": settings("train", train_cfg),
        "compress": [settings("compress", cfg) for cfg in compress_cfgs],
        "benchmark": OmegaConf.to_container(train_cfg.benchmark, resolve=True),
        "variants": [list(v) for v in variants],
    }
    if second_phase_cfg is not None:  # absent for one phase, so the records published before phases stay valid
        described["second_phase"] = settings("train", second_phase_cfg)
    return artifacts.json_sha256(_portable(described, root))


def _portable(value, root: Path):
    """`value` with absolute paths made relative to the checkout (`../shared/data/tnews`) or the home folder
    (`~/.cache/...`): another clone, elsewhere, reads the same data under other absolute paths."""
    if isinstance(value, dict):
        return {k: _portable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, root) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        path = os.path.normpath(value)
        home = os.path.normpath(os.path.expanduser("~"))
        if path.startswith(home + os.sep) and not path.startswith(str(root) + os.sep):
            return "~" + path[len(home):]
        return os.path.relpath(path, root)
    return value


def find_reusable(stage: str, key: str, cfg: DictConfig) -> Reuse | None:
    """The record of a finished `stage` that may stand in for running it again, or None."""
    record = artifacts.read_json(record_path(cfg, key))
    if record and record.get("fingerprint") == fingerprint(stage, cfg) and all(
            digest(Path(out["path"])) == out["sha256"] for out in record.get("outputs", {}).values()):
        return Reuse(record)
    if stage == "train":  # stopped after the training ended, before its record was written
        return _finished_training(key, cfg)
    return None


def _finished_training(key: str, cfg: DictConfig) -> Reuse | None:
    state = finished_training(cfg)
    if state is None:
        return None
    checkpoint = artifacts.finetuned_dir(cfg)
    return Reuse({"stage": "train", "key": key, "finished_at": state["finished"]["at"], "run_id": None,
                  "result": {"checkpoint": str(checkpoint), **state.get("best", {}), "history": state.get("history")},
                  "minutes": 0.0})


def write_record(stage: str, key: str, cfg: DictConfig, result, run_id: str | None, minutes: float) -> Path:
    """Record a finished stage (atomically: a kill leaves the old record or the new one)."""
    outputs = {name: {"path": str(path), "sha256": digest(path)} for name, path in output_files(stage, cfg, result).items()}
    path = record_path(cfg, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_json_atomic(path, {
        "stage": stage, "key": key, "fingerprint": fingerprint(stage, cfg), "outputs": outputs,
        "result": result, "run_id": run_id, "minutes": round(minutes, 4), "finished_at": artifacts.now_iso(),
    })
    return path
