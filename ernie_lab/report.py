"""Result tables built from the runs themselves, so nobody copies numbers by hand."""
from __future__ import annotations

from ernie_lab.reporting import console, table

TASK_TITLES = {"tnews": "TNEWS", "msra_ner": "MSRA_NER", "cmrc2018": "CMRC2018"}
STRATEGY_TITLES = {"none": "", "ptq": "", "dynabert": "+pruned", "dynabert_ptq": "+pruned"}


def variant_name(model: str, strategy: str, precision: str) -> str:
    """`ernie-3.0-medium+pruned(w0.67)+INT8` from the export label `dynabert_ptq-w0.67` and `int8`."""
    base, _, width = strategy.partition("-")
    title = STRATEGY_TITLES.get(base, "+" + base)
    if width:
        title += f"({width})"
    return f"{model}{title}+{precision.upper()}"


def results_from_runs(runs: list) -> list[dict]:
    """The result dicts `seed_table` takes, read back from finished MLflow infer runs (oldest first)."""
    out = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags, metrics = run.data.tags, run.data.metrics
        out.append({
            "task": tags["task"],
            "strategy": tags.get("export_strategy", tags["strategy"]),
            "precision": tags["precision"],
            "primary_metric": tags["primary_metric"],
            **metrics,
        })
    return out


def seed_table(results: list[dict], model: str) -> str:
    """Rows: variants; columns: per task QPS (speedup over the same run's FP32) and metric (delta). Prints it
    with rich and returns it as Markdown."""
    tasks = [t for t in TASK_TITLES if any(r["task"] == t for r in results)]
    tasks += sorted({r["task"] for r in results} - set(tasks))
    by_key = {(r["task"], r["strategy"], r["precision"]): r for r in results}
    baseline = {t: by_key.get((t, "none", "fp32")) for t in tasks}
    variants = list(dict.fromkeys((r["strategy"], r["precision"]) for r in results))
    columns = ["variant"]
    for t in tasks:
        metric = next(r["primary_metric"] for r in results if r["task"] == t)
        columns += [f"{TASK_TITLES.get(t, t)} QPS", f"{TASK_TITLES.get(t, t)} {metric}"]
    rows = []
    for strategy, precision in variants:
        row = [variant_name(model, strategy, precision)]
        for t in tasks:
            r, base = by_key.get((t, strategy, precision)), baseline[t]
            if r is None:
                row += ["-", "-"]
                continue
            metric = f"eval/{r['primary_metric']}"
            qps, value = r["perf/qps"], r[metric]
            if base is not None and base is not r:
                row += [f"{qps:.2f} ({qps / base['perf/qps']:.1f}x)", f"{value:.2f} ({value - base[metric]:+.2f})"]
            else:
                row += [f"{qps:.2f} (1.0x)", f"{value:.2f}"]
        rows.append(row)
    console.print(table(f"{model}: QPS (batch 32) and metric, speedup and delta against FP32", columns, rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
