"""Where each stage leaves its output, so the next stage finds it from the config alone, and writes that
leave either the old or the new file after a crash, never a torn one.

    <artifacts_dir>/<model>/<init>/<task>/finetuned/            train.py
    <artifacts_dir>/<model>/<init>/<task>/export/<strategy>/    compress.py (model.pdmodel, model.pdiparams, manifest.json)
    <artifacts_dir>/<model>/<init>/<task>/export/<strategy>-w0.67/   the same for a pruned strategy, per width
    <artifacts_dir>/<model>/<init>/<task>/dynabert/             compress.py: the width-adaptive model pruning cuts from
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from ernie_lab.errors import MissingArtifactError

MANIFEST = "manifest.json"


def task_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.artifacts_dir) / cfg.model.name / cfg.model.init / cfg.task.name


def finetuned_dir(cfg: DictConfig) -> Path:
    return task_dir(cfg) / "finetuned"


def export_name(cfg: DictConfig, strategy: str) -> str:
    """The export's directory name. Pruned strategies carry the width (`dynabert-w0.67`), so several widths
    can exist side by side; `strategy` is the configured one or its INT8 counterpart, which is pruned alike."""
    if "prune" in cfg.strategy.steps:
        return f"{strategy}-w{float(cfg.prune.width_mult):.2f}"
    return strategy


def export_dir(cfg: DictConfig, strategy: str) -> Path:
    return task_dir(cfg) / "export" / export_name(cfg, strategy)


def width_adaptive_dir(cfg: DictConfig) -> Path:
    return task_dir(cfg) / "dynabert"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in two renames."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("paddlepaddle", "paddlepaddle-gpu", "paddlenlp", "paddleslim", "hydra-core", "mlflow", "ernie-lab"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(directory: Path, made_by: str) -> dict:
    """The manifest of an exported model; a missing or half-written export names the command that makes it."""
    path = directory / MANIFEST
    if not path.is_file():
        raise MissingArtifactError(f"no exported model at {directory} (no {MANIFEST}); make it with `{made_by}`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for name in manifest.get("files", []):
        if not (directory / name).is_file():
            raise MissingArtifactError(f"{directory} lacks {name} listed in its manifest; re-run `{made_by}`")
    return manifest


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
