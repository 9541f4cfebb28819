"""infer.py's body: load the export for (task, strategy, precision), run the eval split through it in a
process of its own, report QPS (the seed's definition) and the task metric, write the predictions file."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ernie_lab import artifacts
from ernie_lab.artifacts import resolve_export
from ernie_lab.errors import EngineCrashed
from ernie_lab.inference import roofline
from ernie_lab.inference.engine import STAGES, run_isolated
from ernie_lab.inference.backends import prepare_for_runtime
from ernie_lab.inference.workload import EvalWorkload
from ernie_lab.reporting import console, fmt, table
from ernie_lab.runtime import fp16_arithmetic, runtime_label
from ernie_lab.tasks import build_task
from ernie_lab.tracking import TrackedRun, engine_name


def predictions_path(cfg: DictConfig, strategy: str, suffix: str) -> Path:
    out = artifacts.task_dir(cfg) / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{strategy}_{cfg.precision.name}{suffix}"


def perf_metrics(result: dict, examples: int, features: int, tokenize_seconds: float) -> dict[str, float]:
    """QPS three ways, each per pass with its median and spread, plus the time split of the median pass.

    - perf/qps: the seed's definition, samples (features) / time with host-side padding inside the timer:
      collate + host-to-device + engine + device-to-host;
    - perf/qps_engine: features / engine time alone;
    - perf/qps_end_to_end: examples / the whole pass: tokenization (timed once, in the parent) plus the child's
      wall clock around collate .. post-process."""
    passes = [{**p, "tokenize": tokenize_seconds, "wall": p["wall"] + tokenize_seconds} for p in result["passes"]]
    seed_seconds = [p["collate"] + p["h2d"] + p["engine"] + p["d2h"] for p in passes]
    qps = np.array([features / s for s in seed_seconds])
    qps_engine = np.array([features / p["engine"] for p in passes])
    qps_e2e = np.array([examples / p["wall"] for p in passes])
    median = passes[int(np.argsort(seed_seconds)[len(passes) // 2])]
    stage_sum = sum(median[s] for s in STAGES)
    batch_ms = np.array(result["batch_seconds"]) * 1000.0
    return {
        "perf/qps": float(np.median(qps)),
        "perf/qps_std": float(qps.std()),
        "perf/qps_min": float(qps.min()),
        "perf/qps_max": float(qps.max()),
        # the seed's timer per example (a CMRC2018 question spans several windows, an MSRA sentence may)
        "perf/qps_examples": float(np.median([examples / s for s in seed_seconds])),
        "perf/qps_engine": float(np.median(qps_engine)),
        "perf/qps_end_to_end": float(np.median(qps_e2e)),
        "perf/qps_end_to_end_features": float(np.median([features / p["wall"] for p in passes])),
        "perf/latency_p50_ms": float(np.percentile(batch_ms, 50)),
        "perf/latency_p90_ms": float(np.percentile(batch_ms, 90)),
        "perf/latency_p99_ms": float(np.percentile(batch_ms, 99)),
        "perf/peak_rss_mb": result["peak_rss_mb"],
        "perf/model_load_seconds": result["load_seconds"],
        "perf/warmup_batches": result["warmup"]["batches"],
        "perf/warmup_seconds": result["warmup"]["seconds"],
        "perf/passes": len(passes),
        **{f"time/{s}_seconds": median[s] for s in STAGES},
        "time/stage_sum_seconds": stage_sum,
        "time/end_to_end_seconds": median["wall"],
        # how much of the wall clock the named stages account for (acceptance: within 5%)
        "time/unaccounted_pct": 100.0 * (median["wall"] - stage_sum) / median["wall"],
    }


def infer(cfg: DictConfig, run: TrackedRun) -> dict:
    from paddlenlp.transformers import ErnieTokenizer

    model_dir, manifest = resolve_export(cfg)
    label = model_dir.name  # the strategy, with the width for pruned ones (dynabert_ptq-w0.67)
    tokenizer = ErnieTokenizer.from_pretrained(str(model_dir))
    task = build_task(cfg.task, tokenizer)
    model_dir = prepare_for_runtime(cfg, task, model_dir)
    bench = cfg.benchmark

    examples = task.load("eval")
    started = time.perf_counter()
    features = task.featurize(examples, training=False)
    tokenize_seconds = time.perf_counter() - started
    console.print(
        f"[bold]infer[/] {cfg.task.name} {label} {cfg.precision.name} on {cfg.runtime.name} "
        f"({cfg.runtime.threads} threads): {len(examples)} examples, batches of {bench.batch_size}, "
        f"{bench.passes} timed pass(es) after >= {bench.warmup_batches} batches and >= {bench.warmup_seconds}s of warm-up"
    )
    # runtime.pad_to_multiple (runtime=cpu): batch lengths rounded up, fewer distinct shapes for oneDNN's caches
    workload = EvalWorkload(task, examples, features, int(bench.batch_size), int(cfg.runtime.get("pad_to_multiple", 1)))
    engine_label = runtime_label(cfg.runtime.name, cfg.precision.name, cfg.runtime.get("int8_mode"))
    try:
        result = run_isolated(
            model_dir, OmegaConf.to_container(cfg.runtime, resolve=True), cfg.precision.name, workload,
            int(bench.warmup_batches), float(bench.warmup_seconds), int(bench.passes),
        )
    except EngineCrashed as exc:  # the failed run carries what the report's row needs (results.crashed_result)
        exc.tags.update({"export_strategy": label, "primary_metric": task.primary_metric, "runtime_label": engine_label,
                         "engine": engine_name(cfg.runtime)})
        raise
    done = result["predictions"]
    predictions, n_features = done["predictions"], done["features"]
    scores = task.metrics(examples, predictions)

    path = predictions_path(cfg, label, task.predictions_suffix)
    task.write_predictions(examples, predictions, path)
    run.log_artifact(path)
    run.log_dict(manifest, "manifest.json")

    metrics = {**perf_metrics(result, len(examples), n_features, tokenize_seconds), **{f"eval/{k}": v for k, v in scores.items()}}
    roof_metrics, roof_params = roofline.for_run(cfg, task, manifest, done["batch_shapes"], len(examples), n_features,
                                                 metrics["perf/qps_engine"])
    metrics.update(roof_metrics)
    compiled = result.get("engine_properties", {})
    _record(run, metrics, {
        **{f"engine.{k}": v for k, v in compiled.items()},
        **roof_params,
        "data.eval_examples": len(examples),
        "data.eval_features": n_features,
        "data.eval_batches": result["batches"],
        "data.seq_len_min": done["seq_len"]["min"],
        "data.seq_len_mean": round(done["seq_len"]["mean"], 2),
        "data.seq_len_max": done["seq_len"]["max"],
        "data.padded_seq_len_mean": round(done["padded_seq_len_mean"], 2),
        "export.dir": str(model_dir),
        "export.strategy": manifest["strategy"],
        "export.parameters": manifest.get("parameters"),
        **{f"version.{k}": v for k, v in artifacts.library_versions().items()},
    }, {
        "export_strategy": label, "primary_metric": task.primary_metric, "runtime_label": engine_label,
        **({"compiled_precision": compiled["INFERENCE_PRECISION_HINT"]} if "INFERENCE_PRECISION_HINT" in compiled else {}),
        **({"fp16_arithmetic": fp16_arithmetic() or "none"} if cfg.precision.name == "fp16" and cfg.runtime.device == "cpu" else {}),
        **({"width_mult": f"{manifest['pruning']['width_mult']:.2f}"} if "pruning" in manifest else {}),
    }, title=f"{cfg.task.name} · {cfg.model.name} · {label} · {cfg.precision.name}")
    # the same fields results.results_from_runs reads back from the run (the main job's report takes these)
    return {"task": cfg.task.name, "model": cfg.model.name, "model_init": cfg.model.init, "strategy": label,
            "precision": cfg.precision.name, "device": cfg.runtime.device, "runtime_label": engine_label,
            "runtime_choice": cfg.runtime.get("reason", ""), "eval_examples": str(len(examples)),
            "primary_metric": task.primary_metric, "predictions": str(path), **metrics}


def _record(run: TrackedRun, metrics: dict, params: dict, tags: dict, title: str) -> None:
    """Log one infer run (params, tags, metrics) and print its speed and score table."""
    run.log_params(params)
    run.set_tags(tags)
    run.log_metrics(metrics)
    shown = ("perf/qps", "perf/gflops", "perf/roofline", "perf/latency", "perf/peak", "time/", "eval/")
    console.print(table(title, ["metric", "value"], [(k, fmt(v)) for k, v in metrics.items() if k.startswith(shown)]))
