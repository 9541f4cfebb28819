"""infer.py's body: load the export for (task, strategy, precision), run the eval split through it in a
process of its own, report QPS (the seed's definition) and the task metric, write the predictions file."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ernie_lab import artifacts
from ernie_lab.compression.strategy import weights_kind
from ernie_lab.errors import ConfigError, MissingArtifactError
from ernie_lab.inference.batching import batches, unbatch
from ernie_lab.inference.engine import measure_isolated
from ernie_lab.reporting import console, fmt, table
from ernie_lab.tasks import build_task
from ernie_lab.tracking import TrackedRun


def resolve_export(cfg: DictConfig) -> tuple[Path, dict]:
    """The export a (strategy, precision) pair runs on: INT8 precisions use the strategy's quantized counterpart."""
    strategy = cfg.strategy
    if cfg.precision.weights == "int8":
        name = strategy.name if weights_kind(strategy) == "int8" else strategy.int8_counterpart
    else:
        if weights_kind(strategy) == "int8":
            raise ConfigError(
                f"strategy={strategy.name} holds an INT8 model, which precision={cfg.precision.name} cannot run; "
                f"use precision=int8, or the float export (strategy=none) for precision={cfg.precision.name}"
            )
        name = strategy.name
    directory = artifacts.export_dir(cfg, name)
    made_by = f"python compress.py task={cfg.task.name} model={cfg.model.name} strategy={name}"
    if "prune" in strategy.steps:
        made_by += f" prune.width_mult={cfg.prune.width_mult}"
    manifest = artifacts.read_manifest(directory, made_by)
    if manifest.get("task") != cfg.task.name or manifest.get("model") != cfg.model.name:
        raise MissingArtifactError(
            f"{directory} holds a {manifest.get('task')}/{manifest.get('model')} export, not "
            f"{cfg.task.name}/{cfg.model.name}; re-run `{made_by}`"
        )
    if manifest.get("weights") != cfg.precision.weights:
        raise MissingArtifactError(f"{directory} holds {manifest.get('weights')} weights; precision={cfg.precision.name} needs {cfg.precision.weights}")
    return directory, manifest


def predictions_path(cfg: DictConfig, strategy: str, suffix: str) -> Path:
    out = artifacts.task_dir(cfg) / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{strategy}_{cfg.precision.name}{suffix}"


def infer(cfg: DictConfig, run: TrackedRun) -> dict:
    from paddlenlp.transformers import ErnieTokenizer

    model_dir, manifest = resolve_export(cfg)
    label = model_dir.name  # the strategy, with the width for pruned ones (dynabert_ptq-w0.67)
    tokenizer = ErnieTokenizer.from_pretrained(str(model_dir))
    task = build_task(cfg.task, tokenizer)
    bench = cfg.benchmark

    t0 = time.perf_counter()
    examples = task.load("eval")
    features = task.featurize(examples, training=False)
    t1 = time.perf_counter()
    chunks = list(batches(features, int(bench.batch_size)))
    feeds = [task.collate(chunk) for chunk in chunks]
    t2 = time.perf_counter()
    console.print(
        f"[bold]infer[/] {cfg.task.name} {label} {cfg.precision.name} on {cfg.runtime.name} "
        f"({cfg.runtime.threads} threads): {len(examples)} examples, {len(features)} features, "
        f"{len(feeds)} batches of {bench.batch_size}"
    )
    result = measure_isolated(
        model_dir, OmegaConf.to_container(cfg.runtime, resolve=True), cfg.precision.name, feeds,
        int(bench.warmup_batches), int(bench.passes),
    )
    t3 = time.perf_counter()
    outputs = [row for chunk, arrays in zip(chunks, result["outputs"]) for row in unbatch(chunk, arrays, task.per_token_outputs)]
    predictions = task.postprocess(examples, features, outputs)
    scores = task.metrics(examples, predictions)
    t4 = time.perf_counter()

    path = predictions_path(cfg, label, task.predictions_suffix)
    task.write_predictions(examples, predictions, path)
    run.log_artifact(path)
    run.log_dict(manifest, "manifest.json")

    engine_seconds = float(np.median(result["pass_seconds"]))
    batch_ms = np.array(result["batch_seconds"]) * 1000.0
    metrics = {
        "perf/qps": len(features) / engine_seconds,
        "perf/qps_examples": len(examples) / engine_seconds,
        "perf/qps_pass_min": len(features) / max(result["pass_seconds"]),
        "perf/qps_pass_max": len(features) / min(result["pass_seconds"]),
        "perf/latency_p50_ms": float(np.percentile(batch_ms, 50)),
        "perf/latency_p90_ms": float(np.percentile(batch_ms, 90)),
        "perf/latency_p99_ms": float(np.percentile(batch_ms, 99)),
        "perf/peak_rss_mb": result["peak_rss_mb"],
        "perf/model_load_seconds": result["load_seconds"],
        "time/tokenize_seconds": t1 - t0,
        "time/collate_seconds": t2 - t1,
        "time/postprocess_seconds": t4 - t3,
        **{f"eval/{k}": v for k, v in scores.items()},
    }
    run.log_params({
        "data.eval_examples": len(examples),
        "data.eval_features": len(features),
        "export.dir": str(model_dir),
        "export.strategy": manifest["strategy"],
        "export.parameters": manifest.get("parameters"),
    })
    run.set_tags({"export_strategy": label, "primary_metric": task.primary_metric})
    if "pruning" in manifest:
        run.set_tags({"width_mult": f"{manifest['pruning']['width_mult']:.2f}"})
    run.log_metrics(metrics)
    console.print(table(
        f"{cfg.task.name} · {cfg.model.name} · {label} · {cfg.precision.name}",
        ["metric", "value"],
        [(k, fmt(v)) for k, v in metrics.items() if k.startswith(("perf/qps", "perf/latency", "perf/peak", "eval/"))],
    ))
    return {"task": cfg.task.name, "strategy": label, "precision": cfg.precision.name,
            "primary_metric": task.primary_metric, "predictions": str(path), **metrics}
