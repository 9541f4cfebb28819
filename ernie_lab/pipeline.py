"""The main job: for each task, fine-tune, compress, benchmark every variant, and print one table shaped like
the seed's (rows: variants; columns: each task's QPS with the speedup over FP32, and its metric).

    python -m ernie_lab.pipeline                      # offline quick start (experiment=quickstart)
    python -m ernie_lab.pipeline experiment=seed_medium pipeline.tasks=[tnews]
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ernie_lab import artifacts, publish, stages
from ernie_lab.cli import call_stage, check_config, command_errors, prepare_cli, prepare_runtime
from ernie_lab.config import resolve_runtime
from ernie_lab.errors import ConfigError, EngineCrashed, ErnieLabError
from ernie_lab.reporting import console, table
from ernie_lab.results import crashed_result, time_rows, write_report
from ernie_lab.tracking import close_failed, end_run, run_tags, start_parent_run, tracked_run, ui_hint


def _stage_config(user_overrides: list[str], extra: list[str]) -> DictConfig:
    """A stage's config, with runtime=auto replaced by the engine it picks for the stage's precision."""
    from hydra import compose

    overrides = user_overrides + extra
    cfg = compose(config_name="pipeline", overrides=overrides)
    return resolve_runtime(cfg, overrides, lambda more: compose(config_name="pipeline", overrides=more))


@dataclass(frozen=True)
class Variant:
    """One infer.py row of the closing table, with what its runtime does with INT8 (read once, when the variant's
    config is checked, so that later decisions need not compose it again)."""
    strategy: str
    precision: str
    extra: tuple[str, ...]  # the variant's own overrides, e.g. ("runtime=onnxruntime", "runtime.int8_mode=static")
    quantizes_float_export: bool  # runtime.quantizes_float_export: ONNX Runtime and OpenVINO quantize it themselves

    @property
    def name(self) -> str:
        return "/".join([self.strategy, self.precision, *self.extra])

    @property
    def reads_paddle_int8(self) -> bool:
        """INT8 on Paddle Inference runs the strategy's quantized export (artifacts.resolve_export's rule)."""
        return self.precision == "int8" and not self.quantizes_float_export


def run_pipeline(cfg: DictConfig, user_overrides: list[str]) -> int:
    from ernie_lab import runtime

    cfg = _stage_config(user_overrides, [])  # runtime=auto: this process trains on the FP32 pick (the CPU or a GPU)
    p = cfg.pipeline
    check_config(cfg)
    for task in p.tasks:  # each task's stages read its own values (e.g. experiment=quickstart's per-task table)
        extra = [f"task={task}", *task_overrides(cfg, task)]
        first = _stage_config(user_overrides, extra)
        check_config(first)
        second = training_phases(cfg, first).second
        if second:  # a second phase's overrides are checked before the first phase runs
            check_config(_stage_config(user_overrides, [*extra, *second]))
    prepare_runtime(cfg, "pipeline")  # this process trains; benchmarks run in children
    int8_engine = int8_runtime(cfg)
    int8_shown = int8_engine or runtime.auto_runtime("int8")[0]
    console.print(f"INT8 rows on runtime={int8_shown} (pipeline.int8_runtime={p.int8_runtime})")
    variants, skipped = [], []
    for strategy, precision, *extra in p.variants:
        if precision == "int8" and int8_engine and not any(e.startswith("runtime=") for e in extra):
            extra = [f"runtime={int8_engine}", *extra]
        # a variant may bring overrides of its own, e.g. `runtime=onnxruntime runtime.int8_mode=static`
        name = "/".join([strategy, precision, *extra])
        try:
            variant_cfg = _stage_config(user_overrides, [f"precision={precision}", *extra])
        except ConfigError as exc:  # runtime=auto finds no engine for the precision here: leave the row out
            skipped.append(f"{name}: {exc}")
            console.print(f"[yellow]skipping {name}:[/] {exc}")
            continue
        check_config(variant_cfg)
        rt_cfg = variant_cfg.runtime
        variant = Variant(strategy, precision, tuple(extra), bool(rt_cfg.get("quantizes_float_export", False)))
        gap = runtime.hardware_gap(rt_cfg, precision) if precision in rt_cfg.precisions else None
        if gap:  # this machine lacks the instructions: leave the row out and say why
            skipped.append(f"{variant.name}: {gap}")
            console.print(f"[yellow]skipping {variant.name}:[/] {gap}")
        else:  # a config mistake fails here, before hours of work, not at its infer stage
            runtime.check_precision(rt_cfg, precision)
            variants.append(variant)
    reads, strategy_cfgs = strategies_read(p.strategies, variants, user_overrides)
    strategies = needed_strategies(p.strategies, reads, strategy_cfgs)
    parent = start_parent_run(cfg, "pipeline", {"sweep_command": "python -m ernie_lab.pipeline " + " ".join(user_overrides),
                                                "int8_runtime": int8_shown})
    try:
        return _run_stages(cfg, user_overrides, parent, strategies, reads, skipped)
    except BaseException as exc:  # stopped (KILLED) or crashed (FAILED): the parent run must not stay RUNNING
        close_failed(parent, exc)
        raise


def task_fingerprint(cfg: DictConfig, user_overrides: list[str], task: str) -> str:
    """The settings fingerprint of all of `task`'s stages (stages.task_fingerprint), from the configs asked for,
    not the ones this machine can run."""
    extra = [f"task={task}", *task_overrides(cfg, task)]
    first = _stage_config(user_overrides, extra)
    phases = training_phases(cfg, first)
    return stages.task_fingerprint(
        first,
        [_stage_config(user_overrides, [*extra, *phases.later, f"strategy={strategy}"])
         for strategy in cfg.pipeline.strategies],
        OmegaConf.to_container(cfg.pipeline.variants, resolve=True),
        _stage_config(user_overrides, [*extra, *phases.second]) if phases.second else None)


def selection_curve(train_cfg: DictConfig, trained: dict, run_id: str | None) -> dict:
    """What a publication shows of a task's fine-tuning: the split its checkpoint was selected on, the scores of
    every evaluation and the best. A training recorded before its result carried the scores has them in its
    MLflow run (selection_history.json)."""
    from ernie_lab.tasks import TASKS
    from ernie_lab.tracking import read_run_json

    history = trained.get("history")
    if history is None and run_id:
        history = (read_run_json(train_cfg.tracking, run_id, "selection_history.json") or {}).get("history")
    task = train_cfg.task
    split = task.data.eval_split
    if task.selection_split == "heldout":
        limit = task.data.limit.heldout
        split = f"held-out ({min(task.data.heldout_size, limit or task.data.heldout_size)} train examples)"
    return {"split": split, "metric": TASKS[task.name].primary_metric, "history": history or [],
            "best": {"step": trained.get("step"), "metric": trained.get("metric"),
                     **({"kept_start": True} if trained.get("kept_from") else {})}}


def task_overrides(cfg: DictConfig, task: str) -> list[str]:
    """`pipeline.task_overrides.<task>`: overrides for that task's stages only (a key that only one task has)."""
    return list((cfg.pipeline.get("task_overrides") or {}).get(task) or [])


def continue_training(cfg: DictConfig, task: str) -> list[str]:
    """`pipeline.continue_training.<task>`: the overrides of a second fine-tuning phase of that task, which starts
    from the first phase's best checkpoint (e.g. [train.epochs=2, train.learning_rate=5e-5]); [] for one phase."""
    return list((cfg.pipeline.get("continue_training") or {}).get(task) or [])


class TrainingPhases(NamedTuple):
    """How a task's fine-tuning is split (`pipeline.continue_training`). `later`: the overrides that put the second
    phase and every stage after it on the first phase's best checkpoint (model.init=checkpoint also gives them a
    task directory of their own, artifacts.task_dir, so the first phase's checkpoint, exports and records stay as
    they are). `second`: the second phase's overrides, `later` and its own. Both empty for one phase."""
    later: list[str]
    second: list[str]


def training_phases(cfg: DictConfig, first: DictConfig) -> TrainingPhases:
    """The phases of the task whose first phase composes to `first` (its training stage's config)."""
    task = first.task.name
    own = continue_training(cfg, task)
    if not own:
        return TrainingPhases([], [])
    if first.model.init == "checkpoint":
        raise ConfigError(f"pipeline.continue_training.{task}: the first phase must not start from model.init=checkpoint "
                          "(the second phase starts from the first's checkpoint and writes beside it); "
                          "use model.init=package, pretrained or random")
    later = ["model.init=checkpoint", f"model.checkpoint_dir='{artifacts.finetuned_dir(first)}'"]
    return TrainingPhases(later, [*later, *own])


def publication_header(cfg: DictConfig, user_overrides: list[str], failures: list[str]) -> list[str]:
    """What a published report says about its run: command, commit, machine, libraries."""
    import subprocess

    from ernie_lab import artifacts, runtime

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    experiment = next((o.split("=", 1)[1] for o in user_overrides if o.startswith("experiment=")), "quickstart")
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    flags = [name for name, present in runtime.cpu_flags().items() if present]
    lines = [
        f"# experiment={experiment}: {', '.join(cfg.pipeline.tasks)}",
        "",
        f"- command: `python -m ernie_lab.pipeline {' '.join(user_overrides)}`",
        f"- commit: {git('rev-parse', 'HEAD')}{dirty}; written {artifacts.now_iso()}",
        f"- CPU: {runtime.cpu_model()}, {os.cpu_count()} logical CPUs; flags: {', '.join(flags)}",
        f"- threads: {cfg.runtime.threads}; libraries: "
        + ", ".join(f"{k} {v}" for k, v in artifacts.library_versions().items()),
    ]
    if failures:
        lines.append(f"- **{len(failures)} stage(s) failed**: " + "; ".join(failures))
    return lines


def int8_runtime(cfg: DictConfig) -> str | None:
    """The runtime the INT8 rows that name none are pinned to, or None where runtime=auto picks it per row by the
    same rule (`runtime.auto_runtime`: OpenVINO's NNCF INT8 on CPUs with VNNI, ONNX Runtime's dynamic INT8
    elsewhere; Paddle's oneDNN INT8, the seed's, loses ~9 MSRA_NER F1 points with VNNI or without). A pipeline
    on runtime=cpu asks the rule too; one on another runtime keeps its own."""
    from ernie_lab import runtime

    choice = cfg.pipeline.int8_runtime
    if choice != "auto":
        return choice
    if cfg.runtime.get("requested") == runtime.AUTO:
        return None
    if cfg.runtime.name != "cpu":
        return cfg.runtime.name
    return runtime.auto_runtime("int8")[0]


def strategies_read(strategies, variants: list[Variant], user_overrides: list[str]) -> tuple[dict, dict]:
    """Each variant's compressions (its own strategy's export, and for INT8 on Paddle Inference the quantized export
    of its int8 counterpart), and the strategy configs of `strategies` and the variants."""
    strategy_cfgs = {s: _stage_config(user_overrides, [f"strategy={s}"]).strategy
                     for s in {*strategies, *(v.strategy for v in variants)}}
    reads = {v: frozenset({v.strategy, *([strategy_cfgs[v.strategy].int8_counterpart] if v.reads_paddle_int8 else [])})
             for v in variants}
    return reads, strategy_cfgs


def needed_strategies(strategies, reads: dict, strategy_cfgs: dict) -> list[str]:
    """`pipeline.strategies` less the Paddle-quantized exports (ptq, dynabert_ptq) that no variant reads: the peer
    engines quantize the float export themselves. `reads`, `strategy_cfgs`: from `strategies_read`."""
    read = set().union(*reads.values())
    kept = []
    for strategy in strategies:
        if "quantize" not in strategy_cfgs[strategy].steps or strategy in read:
            kept.append(strategy)
        else:
            console.print(f"compress strategy={strategy} left out: no variant runs its export")
    return kept


def benchmark_order(strategies: list[str], reads: dict) -> list[tuple[str | None, list[Variant]]]:
    """The order of a task's compressions and benchmarks: each variant is benchmarked as soon as the compressions it
    reads have run (FP32 and INT8 of the unpruned model before DynaBERT's hours of distillation), so a long run
    knows its FP32 score early. Pairs (strategy to compress, variants to benchmark after it); variants reading a
    strategy outside `strategies` come last (strategy None)."""
    order, pending, attempted = [], list(reads), set()
    for strategy in strategies:
        attempted.add(strategy)
        ready = [v for v in pending if reads[v] <= attempted]
        pending = [v for v in pending if v not in ready]
        order.append((strategy, ready))
    if pending:
        order.append((None, pending))
    return order


def with_run_id(stage: str, result, run_id: str | None):
    """A benchmark row names the MLflow run that measured it (runs.csv's `run_id`: its config, logs and metrics)."""
    if stage == "infer" and isinstance(result, dict) and run_id:
        return {**result, "run_id": run_id}
    return result


def _run_stages(cfg: DictConfig, user_overrides: list[str], parent, strategies: list[str],
                reads: dict[Variant, frozenset[str]], skipped: list[str]) -> int:
    """`reads`: the variants to benchmark, in the table's order, with the compressions each reads."""
    p = cfg.pipeline
    variants = list(reads)
    parent.log_text(OmegaConf.to_yaml(cfg), "config.yaml")
    if skipped:
        parent.log_text("\n".join(skipped), "skipped_variants.txt")
    results, failures, crashed, reused = [], [], [], []
    minutes: dict[str, dict[str, float]] = {}  # task -> stage -> wall-clock minutes, failed stages included
    run_ids: dict[tuple[str, str], str | None] = {}  # (task, stage key) -> the MLflow run that made its result
    configs: dict[tuple[str, str], DictConfig] = {}  # (task, stage key) -> the stage's composed config

    def stage(name: str, extra: list[str], phase: list[str] = ()):
        """`phase`: overrides of the training phase the stage belongs to, kept out of its key (a second phase's
        stages have a task directory, and so a record directory, of their own)."""
        task = next(e.split("=", 1)[1] for e in extra if e.startswith("task="))
        stage_cfg = _stage_config(user_overrides, [*extra, *task_overrides(cfg, task), *phase])
        key = stages.stage_key(name, extra)
        configs[(task, key)] = stage_cfg
        found = stages.find_reusable(name, key, stage_cfg) if p.resume else None
        if found is not None:  # finished by an earlier run of this command, with these settings and inputs
            reused.append(f"{task}: {found.describe()}")
            console.print(f"[green]reused[/] {task} {found.describe()}")
            spent = minutes.setdefault(task, {})
            spent[name] = spent.get(name, 0.0) + found.minutes  # the time it took when it ran
            run_ids[(task, key)] = found.record.get("run_id")
            return with_run_id(name, found.result, found.record.get("run_id"))
        started = time.perf_counter()
        try:
            with tracked_run(stage_cfg, name, parent_run_id=parent.run_id) as run:
                result = call_stage(name, stage_cfg, run)
            # a resumed training's minutes include those of the attempts it continues
            spent_minutes = max((time.perf_counter() - started) / 60,
                                result.get("seconds_all_attempts", 0.0) / 60 if isinstance(result, dict) else 0.0)
            stages.write_record(name, key, stage_cfg, result, run.run_id, spent_minutes)
            run_ids[(task, key)] = run.run_id
            return with_run_id(name, result, run.run_id)
        except Exception as exc:  # record, report, and go on with the next task
            failures.append(f"{name} {' '.join(extra)}: {type(exc).__name__}: {exc}")
            if name == "infer" and isinstance(exc, EngineCrashed):  # a row of the table, with the crash as its status
                crashed.append(crashed_result({**run_tags(stage_cfg, name), **exc.tags}))
            console.print(f"[bold red]{name} {' '.join(extra)} failed:[/] {exc}")
            if not isinstance(exc, ErnieLabError):
                console.print_exception(max_frames=8)
            return None
        finally:
            spent = minutes.setdefault(stage_cfg.task.name, {})
            spent[name] = spent.get(name, 0.0) + (time.perf_counter() - started) / 60

    out_dir = Path(p.publish_dir) if p.publish_dir else None
    machines, selections = {}, {}
    for task in p.tasks:
        fingerprint = task_fingerprint(cfg, user_overrides, task) if out_dir else None
        carried = publish.carried_task(out_dir, task, fingerprint) if out_dir and p.resume else None
        if carried is not None:  # finished on this or another machine by the same command, and published
            line = (f"{task}: all stages carried from {carried['path']}, finished {carried['finished_at']} on "
                    f"{publish.machine_line(carried['machine'])}")
            reused.append(line)
            console.print(f"[green]carried[/] {line}", soft_wrap=True)
            results.extend(carried["results"])
            minutes[task] = dict(carried["minutes"])
            machines[task] = carried["machine"]
            if carried.get("selection"):
                selections[task] = carried["selection"]
            continue
        failed_before, task_results = len(failures), []
        trained = stage("train", [f"task={task}"])
        train_key = (task, stages.stage_key("train", [f"task={task}"]))
        phases = training_phases(cfg, configs[train_key])
        if trained is not None and phases.second:  # the second phase continues from the first's best checkpoint
            first = selection_curve(configs[train_key], trained, run_ids.get(train_key))
            trained = stage("train", [f"task={task}"], phases.second)
            if trained is not None:
                selections[task] = {**selection_curve(configs[train_key], trained, run_ids.get(train_key)),
                                    "first_phase": first}
        elif trained is not None:
            selections[task] = selection_curve(configs[train_key], trained, run_ids.get(train_key))
        if trained is not None:
            finished = {}
            for strategy, ready in benchmark_order(strategies, reads):
                if strategy is not None:
                    stage("compress", [f"task={task}", f"strategy={strategy}"], phases.later)
                for v in ready:
                    finished[v] = stage("infer", [f"task={task}", f"strategy={v.strategy}", f"precision={v.precision}",
                                                  *v.extra], phases.later)
            task_results = [finished[v] for v in variants if finished.get(v) is not None]  # the table's order
        results.extend(task_results)
        machines[task] = stages.machine()
        if out_dir and task_results and len(failures) == failed_before:  # publish what is finished, as it finishes
            publish.publish(results, out_dir, publication_header(cfg, user_overrides, failures), minutes, reused,
                            machines, selections)
            publish.write_task_record(out_dir, task, fingerprint, task_results, minutes[task], machines[task],
                                      selections.get(task))
            console.print(f"published {task} to {out_dir} (tasks/{task}.json: the same command elsewhere takes it from there)")

    if reused:
        parent.log_text("\n".join(reused), "reused_stages.txt")
        parent.set_tags({"reused_stages": len(reused)})
    if minutes:
        rows = time_rows(minutes)
        console.print(table("Wall-clock minutes per task and stage", ["task", "train", "compress", "infer", "total"], rows))
        parent.log_metrics({f"time/{task}_minutes": total for task, *_, total in rows if task != "all tasks"})
    if results or crashed:
        results_file = write_report(results + crashed, Path(HydraConfig.get().runtime.output_dir), parent,
                                    minutes=minutes, reused=reused)
        console.print(f"table and Pareto charts written beside {results_file}")
    if out_dir and results:
        published = publish.publish(results, out_dir, publication_header(cfg, user_overrides, failures), minutes, reused,
                                    machines, selections)
        parent.log_artifact(published, "published")
        console.print(f"published to {published.parent} (report.md, runs.csv, predictions/)")
    if failures:
        parent.log_text("\n".join(failures), "failed_stages.txt")
        console.print(f"[bold red]{len(failures)} stage(s) failed:[/]")
        for line in failures:
            console.print(f"  [red]{line}[/]")
    end_run(parent, failed=bool(failures))
    console.print(f"MLflow parent run {parent.run_id} (sweep_id tag); to compare the runs, {ui_hint(cfg.tracking)}")
    return 1 if failures else 0


@hydra.main(config_path="../conf", config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    with command_errors():
        code = run_pipeline(cfg, overrides)
    if code:
        sys.exit(code)


def cli() -> None:
    prepare_cli(config_name="pipeline")
    main()


if __name__ == "__main__":
    cli()
