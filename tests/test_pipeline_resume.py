"""Stage-level resume: a pipeline SIGKILLed inside training, between stages and inside DynaBERT's distillation, then
run again with the same command, ends with the checkpoints, metrics and report of one that was never stopped."""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ernie_lab.config import PROJECT_ROOT
from ernie_lab.tracking import find_runs
from tests.conftest import isolated_overrides

RUN = [
    "model=tiny", "pipeline.tasks=[tnews]", "pipeline.strategies=[none,dynabert]",
    "pipeline.variants=[[none,fp32],[dynabert,fp32]]", "runtime=cpu",
    "quickstart.tnews.max_steps=24", "quickstart.tnews.train_limit=384", "train.save_every_steps=5",
    "quickstart.tnews.prune_steps=4", "prune.train.save_every_steps=2", "prune.importance.samples=32", "prune.eval_samples=32",
    "task.data.limit.eval=96", "task.data.limit.heldout=64", "benchmark.warmup_batches=1",
]
PUBLISH = "pipeline.publish_dir={}"  # the tmp dir's results/
ENV = {**os.environ, "COLUMNS": "200"}


def pipeline(tmp: Path, kill_at: str | None = None, *extra: str) -> subprocess.CompletedProcess:
    head = [str(PROJECT_ROOT / "tests" / "kill_at.py"), kill_at] if kill_at else ["-m", "ernie_lab.pipeline"]
    publish = PUBLISH.format(tmp / "results")
    return subprocess.run([sys.executable, *head, *RUN, publish, *extra, *isolated_overrides(tmp)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=900, env=ENV)


def task_dir(tmp: Path) -> Path:
    return tmp / "artifacts" / "tiny" / "random" / "tnews"


def report(tmp: Path) -> str:
    return sorted((tmp / "outputs" / "runs" / "pipeline").glob("*/results.md"))[-1].read_text()


def scores(text: str) -> list[str]:
    """The seed-shaped table's rows without their speed: variant name and metric cells."""
    rows = [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| tiny")]
    speed = re.compile(r"^[\d.]+ (\([\d.]+x\) )?\[.*\]$|^[\d.]+ \([\d.]+x\)$")  # QPS [GFLOP/s, %] or QPS (speed-up)
    return [[cell for cell in row if not speed.match(cell)] for row in rows]


def eval_metrics(tmp: Path) -> dict:
    out = {}
    for path in sorted((task_dir(tmp) / "stages").glob("infer-*.json")):
        result = json.loads(path.read_text())["result"]
        out[path.stem] = {k: v for k, v in result.items() if k.startswith("eval/")}
    return out


def weights(tmp: Path, model: str = "finetuned") -> dict:
    return load_weights(task_dir(tmp) / model)


def load_weights(directory: Path) -> dict:
    import paddle

    state = paddle.load(str(directory / "model_state.pdparams"))
    return {k: np.asarray(v) for k, v in state.items()}


def selection_row(results_dir: Path) -> str:
    """The published report's fine-tuning curve of TNEWS: its selection split, metric and each evaluation's score."""
    section = (results_dir / "report.md").read_text().split("## Fine-tuning: the selection metric at each evaluation")[1]
    return next(line for line in section.splitlines() if line.startswith("| TNEWS |"))


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """A pipeline that ran from start to end without a stop."""
    out = tmp_path_factory.mktemp("whole")
    done = pipeline(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "published tnews to" in done.stdout  # as soon as the task ended, before the closing table
    return out


def test_a_killed_pipeline_continues_where_it_stopped_and_ends_as_an_unstopped_one(tmp_path, whole):
    stopped = tmp_path / "stopped"

    first = pipeline(stopped, kill_at="train_state")  # inside training, at its first saved state
    assert first.returncode == -9, first.stdout[-2000:] + first.stderr[-2000:]
    assert (task_dir(stopped) / "train_state" / "state.json").is_file()
    assert not (task_dir(stopped) / "stages").exists()

    second = pipeline(stopped, kill_at="record:compress-none")  # between stages: compress none done, dynabert not
    assert second.returncode == -9, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resume from step 5" in second.stdout
    records = sorted(p.stem for p in (task_dir(stopped) / "stages").glob("*.json"))
    assert records == ["compress-none", "train"]

    third = pipeline(stopped, kill_at="distill_state")  # inside compress-dynabert, at distillation's first saved state
    assert third.returncode == -9, third.stdout[-2000:] + third.stderr[-2000:]
    assert (task_dir(stopped) / "dynabert_state" / "state.json").is_file()
    assert not (task_dir(stopped) / "stages" / "compress-dynabert.json").exists()
    # the unpruned model's row was measured before the distillation began (a long run learns its FP32 score early)
    assert (task_dir(stopped) / "stages" / "infer-none-fp32.json").is_file()

    fourth = pipeline(stopped)
    assert fourth.returncode == 0, fourth.stdout[-3000:] + fourth.stderr[-3000:]
    assert re.search(r"reused tnews train finished \S+ \(run \w+", fourth.stdout), fourth.stdout[-3000:]
    assert "reused tnews compress-none finished" in fourth.stdout
    assert "reused tnews infer-none-fp32 finished" in fourth.stdout
    assert "compress-dynabert" not in re.findall(r"reused tnews (\S+)", fourth.stdout)
    assert "resume distillation from step 2 of 4" in fourth.stdout
    assert not (task_dir(stopped) / "dynabert_state").exists()  # removed once its model is saved

    # the same checkpoint, the same scores, the same table
    for model in ("finetuned", "dynabert"):  # the fine-tuned and the distilled width-adaptive model
        a, b = weights(whole, model), weights(stopped, model)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), model
    assert eval_metrics(whole) == eval_metrics(stopped) and len(eval_metrics(whole)) == 2
    assert scores(report(whole)) == scores(report(stopped)) and len(scores(report(whole))) == 2
    assert "## Stages reused from an earlier run of the same command" in report(stopped)
    assert "Stages reused" not in report(whole)
    # the parent run of the last attempt says what it took over
    tracking = {"tracking_uri": f"sqlite:///{stopped / 'mlflow.db'}", "experiment_name": "ernie-lab"}
    from omegaconf import OmegaConf

    parents = find_runs(OmegaConf.create(tracking), "tags.stage = 'sweep' and attributes.status = 'FINISHED'")
    assert [p.data.tags.get("reused_stages") for p in parents] == ["3"]

    # a changed benchmark setting re-runs the benchmarks only; a training whose record was lost (a stop between
    # its end and the record) is found complete in its checkpoint and not run again
    (task_dir(stopped) / "stages" / "train.json").unlink()
    fifth = pipeline(stopped, None, "benchmark.warmup_batches=2")
    assert fifth.returncode == 0, fifth.stdout[-3000:] + fifth.stderr[-3000:]
    assert sorted(re.findall(r"reused tnews (\S+)", fifth.stdout)) == ["compress-dynabert", "compress-none", "train"]
    assert "reused tnews train finished" in fifth.stdout and "fine-tune" not in fifth.stdout
    assert scores(report(stopped)) == scores(report(whole))

    # published where pipeline.publish_dir says: the report, a CSV of the runs, the predictions gzip'd
    published = stopped / "results"
    rows = list(csv.DictReader((published / "runs.csv").open()))
    assert [(r["task"], r["variant"], r["metric"]) for r in rows] == [
        ("tnews", "tiny+FP32", "accuracy"), ("tnews", "tiny+pruned(w0.67)+FP32", "accuracy")]
    assert float(rows[0]["speedup_vs_fp32"]) == 1.0 and float(rows[0]["delta_vs_fp32"]) == 0.0
    infer_runs = {r.info.run_id: r for r in find_runs(OmegaConf.create(tracking), "tags.stage = 'infer'")}
    for row in rows:
        original = task_dir(stopped) / "predictions" / Path(row["predictions"]).name.removesuffix(".gz")
        assert gzip.decompress((published / row["predictions"]).read_bytes()) == original.read_bytes()
        # each row names the MLflow run that measured it, with its config and metrics
        assert round(infer_runs[row["run_id"]].data.metrics["perf/qps"], 2) == float(row["qps"])
    text = (published / "report.md").read_text()
    assert "- commit: " in text and "- CPU: " in text and "## Hours per task and stage" in text
    assert "| tnews | " in text.split("## Hours per task and stage")[1]
    # the curve survives the stops, and a training found only in its checkpoint (train.json removed) still has it
    assert re.match(r"\| TNEWS \| held-out \(64 train examples\) \| accuracy \| (\d+: [\d.]+(, )?)+ \| [\d.]+ at step \d+ \|$", selection_row(published))
    assert selection_row(published) == selection_row(whole / "results")


def test_a_published_task_is_carried_to_a_machine_without_its_artifacts(tmp_path, whole):
    """What a new machine gets from git, results/<experiment>/ without artifacts/, is enough to skip a finished task;
    a changed setting runs it again."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(whole / "results", elsewhere / "results")
    carried = pipeline(elsewhere)
    assert carried.returncode == 0, carried.stdout[-3000:] + carried.stderr[-3000:]
    assert re.search(r"carried tnews: all stages carried from \S+tasks/tnews\.json, finished \S+ on ", carried.stdout)
    assert "fine-tune" not in carried.stdout and not task_dir(elsewhere).exists()  # nothing ran
    assert scores(report(elsewhere)) == scores(report(whole)) and len(scores(report(whole))) == 2
    assert (elsewhere / "results" / "runs.csv").read_text() == (whole / "results" / "runs.csv").read_text()
    for gz in sorted((whole / "results" / "predictions").rglob("*.gz")):
        assert (elsewhere / "results" / gz.relative_to(whole / "results")).read_bytes() == gz.read_bytes()
    assert "all stages carried from" in (elsewhere / "results" / "report.md").read_text()
    assert selection_row(elsewhere / "results") == selection_row(whole / "results")

    changed = pipeline(elsewhere, None, "benchmark.warmup_batches=2")  # another fingerprint: the task runs again
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "carried tnews" not in changed.stdout and "fine-tune tnews" in changed.stdout


def test_a_second_training_phase_starts_from_the_first_and_the_variants_read_it(tmp_path):
    """pipeline.continue_training: phase 2 trains from phase 1's best checkpoint, in a task directory of its own,
    every compression and benchmark reads phase 2's checkpoint, and the published task is carried with both phases."""
    phase_two = ['+pipeline.continue_training.tnews=["train.max_steps=4","train.learning_rate=1e-9"]',
                 "pipeline.strategies=[none]", "pipeline.variants=[[none,fp32]]"]
    done = pipeline(tmp_path, None, *phase_two)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("fine-tune tnews") == 2
    # each selection scoring says how far it is in the log (a finished bar prints its line once)
    assert re.search(r"^select step \d+ (\d+)/\1 \(100%\)", done.stdout, re.M), done.stdout[-3000:]
    first_dir = task_dir(tmp_path)
    second_dir = tmp_path / "artifacts" / "tiny" / "checkpoint" / "tnews"
    first, second = weights(tmp_path), load_weights(second_dir / "finetuned")
    assert first.keys() == second.keys()
    # at a rate of 1e-9 four steps move no weight by 1e-6: phase 2 began from phase 1's weights, not a fresh init
    assert all(np.allclose(first[k], second[k], atol=1e-6) for k in first)
    assert sorted(p.name for p in (first_dir / "stages").glob("*.json")) == ["train.json"]
    assert sorted(p.name for p in (second_dir / "stages").glob("*.json")) == ["compress-none.json", "infer-none-fp32.json", "train.json"]
    scored = json.loads((second_dir / "stages" / "infer-none-fp32.json").read_text())["result"]["predictions"]
    assert Path(scored).is_relative_to(second_dir)
    text = (tmp_path / "results" / "report.md").read_text()
    assert "| TNEWS, phase 1 |" in text and "| TNEWS, phase 2 (from phase 1's best) |" in text

    again = pipeline(tmp_path, None, *phase_two)  # the published task stands for both phases
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "carried tnews: all stages carried" in again.stdout and "fine-tune" not in again.stdout
