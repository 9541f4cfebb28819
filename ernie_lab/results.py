"""Result tables and charts, pure: result rows in (dicts of tags and metrics, e.g. read back from MLflow runs),
the seed-shaped table (`results.md`) and Pareto charts out. No MLflow, no Hydra: the commands that pick the
runs (`python -m ernie_lab.report`, the main job, a sweep's end) live above this module."""
from __future__ import annotations

from pathlib import Path

from ernie_lab.errors import ENGINE_TITLES, crash_status
from ernie_lab.reporting import console, table

TASK_TITLES = {"tnews": "TNEWS", "msra_ner": "MSRA_NER", "cmrc2018": "CMRC2018"}
STRATEGY_TITLES = {"none": "", "ptq": "", "dynabert": "+pruned", "dynabert_ptq": "+pruned"}


def variant_name(model: str, strategy: str, precision: str, runtime_label: str = "") -> str:
    """`ernie-3.0-medium+pruned(w0.67)+INT8` from the export label `dynabert_ptq-w0.67` and `int8`; rows of
    another engine end with it, e.g. ` [onnxruntime dynamic]`."""
    base, _, width = strategy.partition("-")
    title = STRATEGY_TITLES.get(base, "+" + base)
    if width:
        title += f"({width})"
    name = f"{model}{title}+{precision.upper()}".lstrip("+")  # no model: the table names each task's model
    return f"{name} [{runtime_label}]" if runtime_label else name


def results_from_runs(runs: list) -> list[dict]:
    """The result dicts `seed_table` takes, read back from MLflow infer runs (oldest first): every finished run, and
    every failed one whose engine crashed (a `crash_signal` or `crash_exit_code` tag), as a row with a `status`."""
    out = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags, metrics = run.data.tags, run.data.metrics
        status = getattr(run.info, "status", "FINISHED")
        if status != "FINISHED":
            if status == "FAILED" and is_crash(tags):
                out.append(crashed_result(tags, run.info.run_name, run.info.run_id))
            continue
        out.append({
            "task": tags["task"],
            "model": tags.get("model", ""),
            "model_init": tags.get("model_init", ""),
            "eval_examples": run.data.params.get("data.eval_examples"),
            "runtime_choice": tags.get("runtime_choice", ""),
            "run_name": run.info.run_name,
            "strategy": tags.get("export_strategy", tags["strategy"]),
            "precision": tags["precision"],
            "device": tags.get("device", "cpu"),
            "runtime_label": tags.get("runtime_label", ""),
            "primary_metric": tags["primary_metric"],
            "run_id": run.info.run_id,
            **metrics,
        })
    return out


def is_crash(tags: dict) -> bool:
    return "crash_signal" in tags or "crash_exit_code" in tags


def crashed_result(tags: dict, run_name: str = "", run_id: str = "") -> dict:
    """A row for an infer run whose engine crashed, from its tags (the run's own, plus EngineCrashed.tags): no
    figures, and a `status` such as `crashed: SIGSEGV (OpenVINO bf16): double free or corruption (!prev)` that the
    table shows in its cells."""
    cause = tags.get("crash_signal") or f"exit code {tags.get('crash_exit_code')}"
    last = tags.get("crash_stderr", "").split(" | ")[-1]
    engine = tags.get("engine") or (tags.get("runtime_label", "").split(" ")[0] or "paddle")
    status = crash_status(cause, engine, tags.get("precision", "?"), last)
    return {
        "task": tags["task"],
        "model": tags.get("model", ""),
        "model_init": tags.get("model_init", ""),
        "run_name": run_name,
        "strategy": tags.get("export_strategy", tags.get("strategy", "")),
        "precision": tags.get("precision", ""),
        "device": tags.get("device", "cpu"),
        "runtime_label": tags.get("runtime_label", ""),
        "primary_metric": tags.get("primary_metric", "metric"),
        "run_id": run_id,
        "status": status,
    }


def measured(results: list[dict]) -> list[dict]:
    """The rows with figures (not those of crashed runs)."""
    return [r for r in results if not r.get("status")]


def _key(r: dict) -> tuple:
    return r.get("device", "cpu"), r.get("runtime_label", ""), r["strategy"], r["precision"]


def _baselines(results: list[dict], task: str) -> dict[str, dict]:
    """Per device, the Paddle Inference FP32 run of the unpruned model (and FP16 on GPU) of `task`."""
    out = {}
    for r in measured(results):
        if r["task"] == task and not r.get("runtime_label") and r["strategy"] == "none":
            if r["precision"] in ("fp32", "fp16"):
                out[f"{r.get('device', 'cpu')}/{r['precision']}"] = r
    return out


def fp32_baseline(results: list[dict], task: str, device: str = "cpu") -> dict | None:
    """The row every other row of `task` on `device` is measured against in the table (`_baselines`)."""
    return _baselines(results, task).get(f"{device}/fp32")


def missing_baselines(results: list[dict]) -> list[dict]:
    """Per task whose results have no Paddle Inference FP32 run of the unpruned model: what a baseline for it must
    match (task, model, model_init, eval_examples), e.g. an FP16/INT8 sweep run after the main job."""
    wanted = []
    for task in dict.fromkeys(r["task"] for r in results):
        if _baselines(results, task).get("cpu/fp32") is None:
            first = next(r for r in results if r["task"] == task)
            wanted.append({k: first.get(k) for k in ("task", "model", "model_init", "eval_examples")})
    return wanted


def borrowed_note(results: list[dict]) -> str:
    """Names the runs whose FP32 rows came from outside the sweep (`borrowed_from`)."""
    lines = [f"- {TASK_TITLES.get(r['task'], r['task'])}: {r['borrowed_from']}" for r in results if r.get("borrowed_from")]
    if not lines:
        return ""
    return ("\nFP32 rows not run in this sweep, taken from this machine's latest finished run of the same model and eval "
            "examples:\n" + "\n".join(lines) + "\n")


def engine_choices(results: list[dict]) -> str:
    """Which engine runtime=auto picked for each precision of the sweep, and why (the runs' `runtime_choice`)."""
    seen: dict[tuple[str, str], str] = {}
    for r in results:
        if r.get("runtime_choice") and not r.get("borrowed_from"):
            engine = engine_title(r)
            seen.setdefault((r["precision"], engine), r["runtime_choice"])
    if not seen:
        return ""
    lines = [f"- {precision.upper()} on {engine}: {why}" for (precision, engine), why in seen.items()]
    return "\n## Engines picked by runtime=auto\n" + "\n".join(lines) + "\n"


def seed_table(results: list[dict], model: str) -> str:
    """Rows: variants; columns: per task QPS (speedup over the same run's FP32 on the same device, and over FP16
    where there is one) and the metric (delta against that FP32). Prints it with rich and returns Markdown."""
    tasks = [t for t in TASK_TITLES if any(r["task"] == t for r in results)]
    tasks += sorted({r["task"] for r in results} - set(tasks))
    # a variant that ran after crashing once (a rerun) shows its figures, not the crash
    by_key = {}
    for r in results:
        if not r.get("status") or (r["task"], *_key(r)) not in by_key:
            by_key[(r["task"], *_key(r))] = r
    variants = list(dict.fromkeys(_key(r) for r in results))
    columns = ["variant"]
    for t in tasks:
        metric = next(r["primary_metric"] for r in results if r["task"] == t)
        columns += [f"{TASK_TITLES.get(t, t)} QPS", f"{TASK_TITLES.get(t, t)} {metric}"]
    baselines = {t: _baselines(results, t) for t in tasks}
    rows = []
    for key in variants:
        device, label, strategy, precision = key
        row = [variant_name(model, strategy, precision, label) + (" (GPU)" if device == "gpu" else "")]
        if any(r.get("borrowed_from") for r in results if _key(r) == key):
            row[0] += " (earlier run)"
        for t in tasks:
            r = by_key.get((t, *key))
            if r is None:
                row += ["-", "-"]
                continue
            if r.get("status"):  # a crashed run: what happened, in place of its figures
                row += [r["status"], "-"]
                continue
            base = baselines[t]
            fp32, fp16 = base.get(f"{device}/fp32"), base.get(f"{device}/fp16")
            metric = f"eval/{r['primary_metric']}"
            qps, value = r["perf/qps"], r[metric]
            speed = f"{qps:.2f}"
            if fp32 is not None:
                speed += f" ({qps / fp32['perf/qps']:.1f}x)"
            if fp16 is not None and fp16 is not r and precision != "fp32":
                speed += f" ({qps / fp16['perf/qps']:.1f}x vs FP16)"
            speed += roofline_note(r)
            quality = f"{value:.2f}" if fp32 is None or fp32 is r else f"{value:.2f} ({value - fp32[metric]:+.2f})"
            row += [speed, quality]
        rows.append(row)
    title = f"{model or 'each task its model'}: QPS (batch 32) and metric, speedup and delta against FP32"
    console.print(table(title, columns, _plain(rows)))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _plain(rows: list[list[str]]) -> list[list[str]]:
    """Cells printed as written: rich would read `[openvino]` in a variant name as a style tag and drop it."""
    from rich.markup import escape

    return [[escape(str(cell)) for cell in row] for row in rows]


def roofline_note(r: dict) -> str:
    """` [52 GFLOP/s, 81%]`: the run's model GFLOP/s over its engine time and that as a share of this CPU's measured
    GEMM peak for the precision (runs without the figures, e.g. older ones, get nothing)."""
    if r.get("perf/gflops") is None:
        return ""
    pct = r.get("perf/roofline_pct")
    return f" [{r['perf/gflops']:.1f} GFLOP/s" + (f", {pct:.0f}%]" if pct is not None else "]")




def engine_of(r: dict) -> str:
    """The library that ran a result: the first word of its runtime label (empty: Paddle Inference)."""
    return r.get("runtime_label", "").split(" ")[0]


def engine_title(r: dict) -> str:
    """The engine of a result as a user reads it (`Paddle Inference`, `ONNX Runtime`, `OpenVINO`)."""
    engine = engine_of(r) or "paddle"
    return ENGINE_TITLES.get(engine, engine)


def budget_reference(results: list[dict], task: str) -> dict | None:
    """The run a variant's metric loss is measured against: the task's Paddle Inference FP32 run of the unpruned
    model (CPU, else GPU), or, in a sweep without one, the best unpruned FP32 run of any engine."""
    base = _baselines(results, task)
    reference = base.get("cpu/fp32") or base.get("gpu/fp32")
    if reference is None:
        fp32 = [r for r in results if r["task"] == task and r["precision"] == "fp32" and r["strategy"] == "none"]
        reference = max(fp32, key=lambda r: r[f"eval/{r['primary_metric']}"], default=None)
    return reference


def within_budget(results: list[dict], task: str, budget: float) -> list[dict]:
    """The task's results whose primary metric is at most `budget` points below the reference (all of them when
    the sweep has no FP32 run to measure against)."""
    rows = [r for r in results if r["task"] == task]
    reference = budget_reference(results, task)
    if reference is None:
        return rows
    metric = f"eval/{reference['primary_metric']}"
    return [r for r in rows if r[metric] >= reference[metric] - budget - 1e-9]


def engine_ranking(results: list[dict], model: str, budget: float = 0.5) -> str:
    """Per task, the engines ranked by their fastest variant within `budget` points of FP32, and the fastest
    variant of all; printed as a table and returned as Markdown."""
    lines, rows = [], []
    for task in dict.fromkeys(r["task"] for r in results):
        title = TASK_TITLES.get(task, task)
        ok = within_budget(results, task, budget)
        best: dict[str, dict] = {}
        for r in ok:
            engine = engine_of(r)
            if engine not in best or r["perf/qps"] > best[engine]["perf/qps"]:
                best[engine] = r
        ranked = sorted(best.values(), key=lambda r: r["perf/qps"], reverse=True)
        if not ranked:
            lines.append(f"- {title}: no variant within {budget:g} point of FP32")
            continue
        metric = ranked[0]["primary_metric"]
        order = " > ".join(
            f"{engine_title(r)} {r['perf/qps']:.2f} QPS "
            f"({variant_name(model, r['strategy'], r['precision'], r.get('runtime_label', ''))}, "
            f"{metric} {r[f'eval/{metric}']:.2f}{roofline_note(r)})"
            for r in ranked
        )
        lines.append(f"- {title}: {order}")
        top = ranked[0]
        rows.append([title, variant_name(model, top["strategy"], top["precision"], top.get("runtime_label", "")),
                     f"{top['perf/qps']:.2f}{roofline_note(top)}", f"{top[f'eval/{metric}']:.2f}",
                     " > ".join(engine_title(r) for r in ranked)])
    if rows:
        console.print(table(f"Fastest variant per task within {budget:g} point of FP32, all engines",
                            ["task", "fastest variant", "QPS", "metric", "engines, fastest first"], _plain(rows)))
    head = f"\n## Fastest within {budget:g} point of FP32, per task (engines ranked by their fastest such variant)\n"
    return head + "\n".join(lines) + "\n" if lines else ""


def engine_comparison(results: list[dict]) -> str:
    """Per task: the best Paddle Inference INT8 QPS against the best INT8 of every other engine in the sweep."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        int8 = [r for r in results if r["task"] == task and r["precision"] == "int8"]
        paddle = max((r for r in int8 if not r.get("runtime_label")), key=lambda r: r["perf/qps"], default=None)
        others = {}
        for r in int8:
            engine = r.get("runtime_label", "").split(" ")[0]
            if engine and (engine not in others or r["perf/qps"] > others[engine]["perf/qps"]):
                others[engine] = r
        for engine, best in others.items():
            if paddle is None:
                continue
            metric = f"eval/{paddle['primary_metric']}"
            lines.append(
                f"- {TASK_TITLES.get(task, task)}: Paddle Inference INT8 ({paddle['strategy']}) {paddle['perf/qps']:.2f} QPS vs "
                f"{best['runtime_label']} ({best['strategy']}) {best['perf/qps']:.2f} QPS = "
                f"{paddle['perf/qps'] / best['perf/qps']:.2f}x; {paddle['primary_metric']} {paddle[metric]:.2f} vs {best[metric]:.2f}"
            )
    return ("\n## Best INT8 per engine\n" + "\n".join(lines) + "\n") if lines else ""


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both QPS and metric (higher is better for both)."""
    front = []
    for i, (q, m) in enumerate(points):
        if not any((q2 >= q and m2 >= m) and (q2 > q or m2 > m) for q2, m2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_chart(results: list[dict], task: str, model: str, path: Path) -> Path:
    """Metric against QPS for every variant of `task`, the Pareto front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["task"] == task]
    metric = rows[0]["primary_metric"]
    points = [(r["perf/qps"], r[f"eval/{metric}"]) for r in rows]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for i, (r, (q, m)) in enumerate(zip(rows, points)):
        on_front = i in front
        ax.scatter(q, m, s=60 if on_front else 35, color="tab:red" if on_front else "tab:blue", zorder=3)
        label = variant_name("", r["strategy"], r["precision"], r.get("runtime_label", ""))
        # labels of neighbouring points are staggered vertically so that equal metrics stay readable
        rank = sorted(range(len(points)), key=lambda j: points[j][0]).index(i)
        ax.annotate(label, (q, m), textcoords="offset points", xytext=(5, 6 + 11 * (rank % 4)), fontsize=8)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", lw=1, zorder=2,
            label="Pareto front")
    ax.set_xlabel("QPS (batch 32, higher is better)")
    ax.set_ylabel(f"{metric} (higher is better)")
    ax.set_title(f"{TASK_TITLES.get(task, task)} · {model}: {metric} against QPS")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def time_rows(minutes: dict[str, dict[str, float]]) -> list[list]:
    """[task, train, compress, infer, total] minutes (two decimals) per task, and an "all tasks" row."""
    stages = ("train", "compress", "infer")
    rows = [[task, *(round(spent.get(s, 0.0), 2) for s in stages), round(sum(spent.values()), 2)]
            for task, spent in minutes.items()]
    rows.append(["all tasks", *(round(sum(r[i] for r in rows), 2) for i in range(1, 5))])
    return rows


def time_section(minutes: dict[str, dict[str, float]]) -> str:
    lines = ["| task | train | compress | infer | total |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in time_rows(minutes)]
    return "\n## Wall-clock minutes per task and stage\n" + "\n".join(lines) + "\n"


def task_models(results: list[dict]) -> dict[str, str]:
    """Each task's model, or its models joined in the order seen (a sweep over `model=`)."""
    seen: dict[str, dict[str, None]] = {}
    for r in results:
        seen.setdefault(r["task"], {})[r["model"]] = None
    return {task: " / ".join(models) for task, models in seen.items()}


def write_report(results: list[dict], out_dir: Path, parent=None, budget: float = 0.5,
                 minutes: dict[str, dict[str, float]] | None = None, reused: list[str] | None = None) -> Path:
    """results.md and one Pareto PNG per task into `out_dir`, also logged on `parent` (anything with a TrackedRun's
    `log_text`/`log_artifact`). `minutes` (task -> stage -> minutes) adds the main job's time table. Where tasks
    ran different models (the quick start's per-task depths), a line names each task's and the rows name none."""
    out_dir.mkdir(parents=True, exist_ok=True)
    models = task_models(results)
    model = next(iter(models.values())) if len(set(models.values())) == 1 else ""
    markdown = ""
    if not model:
        markdown = "Models: " + ", ".join(f"{TASK_TITLES.get(t, t)} {m}" for t, m in models.items()) + "\n\n"
        console.print(markdown.strip())
    figures = measured(results)  # crashed runs are rows of the table, with their status, and nothing else
    markdown += seed_table(results, model) + borrowed_note(results) + engine_choices(results)
    markdown += engine_comparison(figures) + engine_ranking(figures, model, budget)
    if minutes:
        markdown += time_section(minutes)
    if reused:  # a resumed pipeline: these stages' rows and minutes come from the run that made them
        markdown += "\n## Stages reused from an earlier run of the same command\n" + "".join(f"- {r}\n" for r in reused)
    (out_dir / "results.md").write_text(markdown, encoding="utf-8")
    charts = [pareto_chart(figures, t, m, out_dir / f"pareto_{t}.png") for t, m in task_models(figures).items()]
    if parent is not None:
        parent.log_text(markdown, "results.md")
        for chart in charts:
            parent.log_artifact(chart, "report")
    return out_dir / "results.md"
