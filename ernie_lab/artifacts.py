"""Where each stage leaves its output, so the next stage finds it from the config alone, and writes that
leave either the old or the new file after a crash, never a torn one.

    <artifacts_dir>/<model>/<init>/<task>/finetuned/            train.py
    <artifacts_dir>/<model>/<init>/<task>/export/<strategy>/    compress.py (model.pdmodel, model.pdiparams, manifest.json)
    <artifacts_dir>/<model>/<init>/<task>/export/<strategy>-w0.67/   the same for a pruned strategy, per width
    <artifacts_dir>/<model>/<init>/<task>/dynabert/             compress.py: the width-adaptive model pruning cuts from
    <artifacts_dir>/<model>/<init>/<task>/train_state/          train.py while it runs: what resuming needs

Writes go to a hidden sibling (`.<name>.tmp-<pid>-*`) that replaces the target in one atomic step, so a reader
(which only ever opens `<name>/...`) sees the complete old or the complete new content. A killed writer leaves
its hidden sibling behind; the next write to the same target removes those of dead processes.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from ernie_lab.errors import ConfigError, MissingArtifactError

MANIFEST = "manifest.json"
# A static Paddle Inference model as compress.py writes it and every engine reads it.
INPUT_NAMES = ("input_ids", "token_type_ids")
MODEL_FILE = "model.pdmodel"
PARAMS_FILE = "model.pdiparams"
#: leftovers older than this (about when this process started) whose writer is gone are removed
PROCESS_STARTED = time.time()


def weights_kind(strategy: DictConfig) -> str:
    """`int8` if the strategy's export holds quantized weights, else `float`."""
    return "int8" if quantizes(strategy) else "float"


def prunes(strategy: DictConfig) -> bool:
    """Whether the strategy makes a narrower model (its export names then carry the width)."""
    return "prune" in strategy.steps


def quantizes(strategy: DictConfig) -> bool:
    return "quantize" in strategy.steps


def task_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.artifacts_dir) / cfg.model.name / cfg.model.init / cfg.task.name


def finetuned_dir(cfg: DictConfig) -> Path:
    return task_dir(cfg) / "finetuned"


def export_name(cfg: DictConfig, strategy: str) -> str:
    """The export's directory name. Pruned strategies carry the width (`dynabert-w0.67`), so several widths
    can exist side by side; `strategy` is the configured one or its INT8 counterpart, which is pruned alike."""
    if prunes(cfg.strategy):
        return f"{strategy}-w{float(cfg.prune.width_mult):.2f}"
    return strategy


def export_dir(cfg: DictConfig, strategy: str) -> Path:
    return task_dir(cfg) / "export" / export_name(cfg, strategy)


def width_adaptive_dir(cfg: DictConfig) -> Path:
    return task_dir(cfg) / "dynabert"


def train_state_dir(cfg: DictConfig) -> Path:
    return task_dir(cfg) / "train_state"


def distill_state_dir(cfg: DictConfig) -> Path:
    """DynaBERT's resumable distillation state, beside the width-adaptive model it becomes."""
    return task_dir(cfg) / "dynabert_state"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it takes the place of `final` in one atomic exchange
    (two renames where the system has no exchange: a kill between them leaves `final` missing, never torn)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not final.exists():
        os.replace(tmp, final)
    elif exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old content
    else:
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system or kernel without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_stale_siblings(target: Path, before: float | None = None) -> list[Path]:
    """Remove what killed writers left next to `target`: `.<name>.tmp-<pid>...` and `.<name>.old-<pid>`
    entries whose process is gone and that are older than `before` (default: when this process started).
    Only names of exactly that pattern are touched; a live writer's entries never are."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)(?:-.*)?")
    cutoff = PROCESS_STARTED if before is None else before
    removed = []
    for entry in target.parent.iterdir() if target.parent.is_dir() else []:
        match = pattern.fullmatch(entry.name)
        if not match or process_alive(int(match.group(1))) or entry.lstat().st_mtime >= cutoff:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process, or no pid at all: leave it alone
        return True
    return True


def write_json_atomic(path: Path, data: dict) -> None:
    remove_stale_siblings(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def json_sha256(data) -> str:
    """sha256 of `data` as canonical JSON (sorted keys; anything JSON lacks as its str)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


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


def make_command(script: str, cfg: DictConfig, *extra: str) -> str:
    """The command that makes a missing artifact for this config: `model=` only where the model's name is a
    config option (the quick start's e5-small-zh-l4 is `model=e5-small-zh-quickstart`, the default)."""
    from ernie_lab.config import CONF_DIR

    model = f" model={cfg.model.name}" if (CONF_DIR / "model" / f"{cfg.model.name}.yaml").is_file() else ""
    return f"python {script} task={cfg.task.name}{model} {' '.join(extra)}".rstrip()


def resolve_export(cfg: DictConfig) -> tuple[Path, dict]:
    """The export a (strategy, precision) pair runs on: INT8 precisions use the strategy's quantized counterpart,
    except on a runtime that quantizes the float export itself (`runtime.quantizes_float_export`: ONNX Runtime,
    OpenVINO). Checked for every job of a sweep before the first starts (ernie_lab.cli), and again by infer."""
    strategy = cfg.strategy
    weights = cfg.precision.weights
    if weights == "int8" and cfg.runtime.get("quantizes_float_export"):
        if weights_kind(strategy) == "int8":
            raise ConfigError(
                f"runtime={cfg.runtime.name} quantizes the float export itself, and strategy={strategy.name} holds "
                f"Paddle's INT8 model; use precision=int8 with a float strategy (none, dynabert)"
            )
        name, weights = strategy.name, "float"
    elif weights == "int8":
        name = strategy.name if weights_kind(strategy) == "int8" else strategy.int8_counterpart
    else:
        if weights_kind(strategy) == "int8":
            raise ConfigError(
                f"strategy={strategy.name} holds an INT8 model, which precision={cfg.precision.name} cannot run; "
                f"use precision=int8, or the float export (strategy=none) for precision={cfg.precision.name}"
            )
        name = strategy.name
    directory = export_dir(cfg, name)
    made_by = make_command("compress.py", cfg, f"strategy={name}")
    if prunes(strategy):
        made_by += f" prune.width_mult={cfg.prune.width_mult}"
    manifest = read_manifest(directory, made_by)
    if manifest.get("task") != cfg.task.name or manifest.get("model") != cfg.model.name:
        raise MissingArtifactError(
            f"{directory} holds a {manifest.get('task')}/{manifest.get('model')} export, not "
            f"{cfg.task.name}/{cfg.model.name}; re-run `{made_by}`"
        )
    if manifest.get("weights") != weights:
        raise MissingArtifactError(f"{directory} holds {manifest.get('weights')} weights; precision={cfg.precision.name} needs {weights}")
    return directory, manifest
