"""A long run's published results: `results/<experiment>/` holds its report, a CSV of its runs and its prediction
files (gzip), so anyone can read, compare and re-score them without re-running hours of work.

    report.md                     the seed-shaped table, the seed's CPU table beside it, accuracy cost per variant,
                                  hours per stage, the machine (CPU model and flags) and the commit
    runs.csv                      one row per benchmarked variant: task, variant, engine, precision, metric, QPS
    predictions/<task>/<file>.gz  each variant's predictions in the task's own format (TNEWS and MSRA_NER JSON
                                  lines with `id`, CMRC2018 the official {question id: answer} JSON)
    tasks/<task>.json             a finished task: its rows, minutes and machine, and the fingerprint of the settings
                                  that made them (ernie_lab.stages.task_fingerprint)

A long run publishes after each task it finishes. Committed, the task records carry finished tasks to another
machine: the same command there takes a task whose record matches its settings from here and runs only the rest
(a machine change loses the artifacts, and a task can take longer than a session).

Pure apart from the files it writes: the caller (the pipeline) passes the results and what describes the run."""
from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

from ernie_lab import artifacts
from ernie_lab.results import (TASK_TITLES, engine_choices, fp32_baseline, measured, seed_table, time_rows,
                               variant_name)

# The seed's CPU table (../shared/seed/ernie-3.0-benchmark.md, ERNIE 3.0-Medium, 12 threads): speed-up over FP32 and
# metric, per variant and task.
SEED_CPU = {
    "FP32": {"tnews": (1.0, 57.45), "msra_ner": (1.0, 93.04), "cmrc2018": (1.0, 66.95)},
    "INT8": {"tnews": (1.9, 56.57), "msra_ner": (1.6, 92.64), "cmrc2018": (1.7, 66.23)},
    "pruned FP32": {"tnews": (1.3, 57.31), "msra_ner": (1.3, 93.27), "cmrc2018": (1.4, 65.55)},
    "pruned INT8": {"tnews": (2.3, 56.69), "msra_ner": (2.4, 92.39), "cmrc2018": (2.2, 63.47)},
}
CSV_COLUMNS = ["task", "variant", "strategy", "precision", "engine", "metric", "value", "delta_vs_fp32", "qps",
               "speedup_vs_fp32", "eval_examples", "predictions", "run_id"]


def seed_variant(r: dict) -> str | None:
    """The seed's row a result stands beside (FP32, INT8, pruned FP32, pruned INT8), None for the others (BF16)."""
    if r["precision"] not in ("fp32", "int8"):
        return None
    pruned = r["strategy"].startswith("dynabert")
    return ("pruned " if pruned else "") + r["precision"].upper()


def csv_rows(results: list[dict], prediction_files: dict[int, str]) -> list[dict]:
    rows = []
    for i, r in enumerate(measured(results)):
        metric = r["primary_metric"]
        value, base = r[f"eval/{metric}"], fp32_baseline(results, r["task"], r.get("device", "cpu"))
        rows.append({
            "task": r["task"], "variant": variant_name(r["model"], r["strategy"], r["precision"], r.get("runtime_label", "")),
            "strategy": r["strategy"], "precision": r["precision"], "engine": r.get("runtime_label") or "paddle",
            "metric": metric, "value": round(value, 4),
            "delta_vs_fp32": round(value - base[f"eval/{metric}"], 4) if base else "",
            "qps": round(r["perf/qps"], 2), "speedup_vs_fp32": round(r["perf/qps"] / base["perf/qps"], 3) if base else "",
            "eval_examples": r.get("eval_examples", ""), "predictions": prediction_files.get(i, ""),
            "run_id": r.get("run_id", ""),
        })
    return rows


def accuracy_cost(rows: list[dict]) -> str:
    """Per seed variant: the metric lost against FP32 on each task, the average and the worst, beside the seed's."""
    lines = ["| variant | " + " | ".join(f"{TASK_TITLES[t]} loss (seed)" for t in TASK_TITLES)
             + " | average loss (seed) | worst |", "|---|" + "---|" * (len(TASK_TITLES) + 2)]
    for variant, seed in SEED_CPU.items():
        if variant == "FP32":
            continue
        ours = {}
        for row in rows:
            if row["delta_vs_fp32"] != "" and seed_variant(row) == variant and row["task"] not in ours:
                ours[row["task"]] = -row["delta_vs_fp32"]
        seed_losses = {t: SEED_CPU["FP32"][t][1] - metric for t, (_, metric) in seed.items()}
        cells = [f"{ours[t]:.2f} ({seed_losses[t]:.2f})" if t in ours else f"- ({seed_losses[t]:.2f})" for t in TASK_TITLES]
        seed_avg = sum(seed_losses.values()) / len(seed_losses)
        avg = f"{sum(ours.values()) / len(ours):.2f}" if ours else "-"
        worst = f"{max(ours.values()):.2f}" if ours else "-"
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {avg} ({seed_avg:.2f}) | {worst} |")
    return "\n".join(lines) + "\n"


def seed_beside(rows: list[dict]) -> str:
    """Our speed-ups and metrics beside the seed's, per variant and task."""
    lines = ["| variant | " + " | ".join(f"{TASK_TITLES[t]} speed-up (seed) | {TASK_TITLES[t]} metric (seed)"
                                        for t in TASK_TITLES) + " |", "|---|" + "---|---|" * len(TASK_TITLES)]
    for variant, seed in SEED_CPU.items():
        cells = []
        for t in TASK_TITLES:
            row = next((r for r in rows if r["task"] == t and seed_variant(r) == variant), None)
            ratio, metric = seed[t]
            if row is None:
                cells += [f"- ({ratio:.1f}x)", f"- ({metric:.2f})"]
            else:
                speed = f"{row['speedup_vs_fp32']:.1f}x" if row["speedup_vs_fp32"] != "" else "-"
                cells += [f"{speed} ({ratio:.1f}x)", f"{row['value']:.2f} ({metric:.2f})"]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def hours_section(minutes: dict[str, dict[str, float]]) -> str:
    """The main job's minutes table (`time_rows`), in hours."""
    lines = ["| task | train | compress | infer | total |", "|---|---|---|---|---|"]
    for task, *spent in time_rows(minutes):
        lines.append(f"| {task} | " + " | ".join(f"{m / 60:.2f}" for m in spent) + " |")
    return "\n".join(lines) + "\n"


TASKS_DIR = "tasks"
PREDICTIONS_DIR = "predictions"


def published_predictions(r: dict) -> str:
    """Where a result's predictions file goes in a publication, relative to it."""
    source = Path(r.get("predictions", ""))
    name = f"{source.name}.gz"
    if r.get("runtime_label"):  # the same variant on another engine keeps its own file
        name = f"{source.stem}_{r['runtime_label'].replace(' ', '_')}{source.suffix}.gz"
    return f"{PREDICTIONS_DIR}/{r['task']}/{name}"


def _write_predictions(results: list[dict], out_dir: Path) -> dict[int, str]:
    """Gzip each measured result's predictions into a new predictions/ that then replaces the old one; a result
    carried from a task record keeps the copy published when it ran (its own file was on the machine that ran it)."""
    staging = out_dir / f"{PREDICTIONS_DIR}.new"
    shutil.rmtree(staging, ignore_errors=True)
    files = {}
    for i, r in enumerate(measured(results)):
        relative = published_predictions(r)
        target = staging / Path(relative).relative_to(PREDICTIONS_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        source, earlier = Path(r.get("predictions", "")), out_dir / relative
        if r.get("carried_from") and earlier.is_file():
            shutil.copyfile(earlier, target)
        elif source.is_file():
            # no name or time in the header: the same predictions give the same bytes (no churn when committed)
            with source.open("rb") as src, target.open("wb") as raw, \
                    gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as dst:
                shutil.copyfileobj(src, dst)
        else:
            continue
        files[i] = relative
    shutil.rmtree(out_dir / PREDICTIONS_DIR, ignore_errors=True)
    staging.mkdir(exist_ok=True)
    staging.rename(out_dir / PREDICTIONS_DIR)
    return files


def write_task_record(out_dir: Path, task: str, fingerprint: str, results: list[dict], minutes: dict[str, float],
                      machine: dict, selection: dict | None = None) -> Path:
    """tasks/<task>.json: a finished task's rows, minutes, machine and selection curve under the fingerprint of its
    settings."""
    path = out_dir / TASKS_DIR / f"{task}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"task": task, "fingerprint": fingerprint, "finished_at": artifacts.now_iso(), "machine": machine,
              "minutes": minutes, "results": results}
    if selection:
        record["selection"] = selection
    artifacts.write_json_atomic(path, record)
    return path


def carried_task(out_dir: Path, task: str, fingerprint: str) -> dict | None:
    """The published record of `task` when it was made with these settings and its predictions are all there
    (then its results carry `carried_from`), else None."""
    path = out_dir / TASKS_DIR / f"{task}.json"
    record = artifacts.read_json(path)
    if not record or record.get("fingerprint") != fingerprint:
        return None
    results = [{**r, "carried_from": str(path)} for r in record["results"]]
    if not all((out_dir / published_predictions(r)).is_file() for r in measured(results)):
        return None
    return {**record, "results": results, "path": path}


def selection_section(selections: dict[str, dict]) -> str:
    """Per task: the split its fine-tuned checkpoint was selected on and its metric at each evaluation (step: value),
    so a reader sees whether the training had levelled off; every benchmarked row starts from the best."""
    lines = ["| task | selected on | metric | step: value at each evaluation | best |", "|---|---|---|---|---|"]
    for task in [t for t in TASK_TITLES if t in selections] + sorted(set(selections) - set(TASK_TITLES)):
        s = selections[task]
        title = TASK_TITLES.get(task, task)
        if s.get("first_phase"):  # a second training phase (pipeline.continue_training) started from this one's best
            lines.append(_selection_row(f"{title}, phase 1", s["first_phase"]))
            title += ", phase 2 (from phase 1's best)"
        lines.append(_selection_row(title, s))
    return "\n".join(lines) + "\n"


def _selection_row(title: str, s: dict) -> str:
    curve = ", ".join(f"{h['step']}: {h[s['metric']]:.2f}" for h in s["history"] if s["metric"] in h) or "-"
    best = s.get("best") or {}
    best_text = f"{best['metric']:.2f} at step {best['step']}" if best.get("metric") is not None else "-"
    if best.get("kept_start"):  # no evaluation of this phase beat the checkpoint it started from, which it kept
        best_text = f"{best['metric']:.2f}, its start's (step {best['step']} there), kept: no evaluation here beat it"
    return f"| {title} | {s['split']} | {s['metric']} | {curve} | {best_text} |"


def machine_line(machine: dict) -> str:
    flags = [f for f in machine.get("flags", []) if f.startswith(("avx", "amx", "fma"))]
    return f"{machine.get('cpu', 'unknown CPU')}; flags: {' '.join(flags) or 'none of avx/amx/fma'}"


def publish(results: list[dict], out_dir: Path, header: list[str], minutes: dict[str, dict[str, float]],
            reused: list[str], machines: dict[str, dict] | None = None, selections: dict[str, dict] | None = None) -> Path:
    """Write report.md, runs.csv and predictions/ into `out_dir` (replacing an earlier publication's files).
    `machines`: the machine each task ran on, where they differ (tasks carried from another machine).
    `selections`: each task's fine-tuning curve (`selection_section`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _write_predictions(results, out_dir)
    rows = csv_rows(results, files)
    with (out_dir / "runs.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    models = {r["model"] for r in results}
    text = "\n".join(header) + "\n\n## Results (QPS at batch 32, full eval splits)\n\n"
    text += seed_table(results, models.pop() if len(models) == 1 else "")
    text += engine_choices(results)
    text += "\n## Beside the seed's CPU table (ERNIE 3.0-Medium; seed's figures in brackets)\n\n" + seed_beside(rows)
    text += "\n## Accuracy lost against FP32 (seed's loss in brackets)\n\n" + accuracy_cost(rows)
    if selections:
        text += ("\n## Fine-tuning: the selection metric at each evaluation\n\n"
                 "Every row above starts from the checkpoint best on its task's selection split.\n\n"
                 + selection_section(selections))
    text += "\n## Hours per task and stage\n\n" + hours_section(minutes)
    if machines and len({json.dumps(m, sort_keys=True) for m in machines.values()}) > 1:
        text += ("\nThe tasks ran on different machines; each task's speed-ups are of its own FP32 on its own:\n"
                 + "".join(f"- {task}: {machine_line(m)}\n" for task, m in machines.items()))
    if reused:
        text += "\nStages this run took over from earlier runs of the same command (their hours are those runs'):\n"
        text += "".join(f"- {line}\n" for line in reused)
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    return out_dir / "report.md"
