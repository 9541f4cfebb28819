"""MSRA_NER and CMRC2018 through train -> export/PTQ -> infer with a tiny model, and the check that matters for
trust: the metric logged to MLflow equals what the reference definitions compute from the written predictions
file (seqeval for entity F1; the official CMRC2018 evaluator's EM/F1)."""
from __future__ import annotations

import json

import pytest

from ernie_lab.tracking import find_runs
from tests.conftest import DATA_DIR, isolated_overrides, make_cfg, run_stage

SETTINGS = {
    "msra_ner": ["task.data.limit.train=160", "task.data.limit.eval=120", "task.data.limit.heldout=64"],
    # 128-token windows keep the tiny run fast; the question count still covers multi-window contexts
    "cmrc2018": ["task.max_seq_length=128", "task.data.limit.train=48", "task.data.limit.eval=40",
                 "task.data.limit.heldout=64", "task.selection_split=heldout"],
}
COMMON = ["model=tiny", "train.epochs=2", "train.batch_size=16", "train.learning_rate=3e-3",
          "quantize.batch_size=8", "quantize.batch_nums=2", "benchmark.warmup_batches=1"]


@pytest.fixture(scope="module", params=["msra_ner", "cmrc2018"])
def benchmarked(request, tmp_path_factory):
    """Train, export, quantize and benchmark one task; returns the infer results per precision."""
    from ernie_lab.compression.strategy import compress
    from ernie_lab.inference.benchmark import infer
    from ernie_lab.training import finetune

    task = request.param
    workdir = tmp_path_factory.mktemp(task)

    def cfg(*extra):
        return make_cfg(isolated_overrides(workdir) + [f"task={task}"] + COMMON + SETTINGS[task] + list(extra))

    run_stage(cfg(), "train", finetune)
    for strategy in ("none", "ptq"):
        run_stage(cfg(f"strategy={strategy}"), "compress", compress)
    results = {p: run_stage(cfg(f"precision={p}"), "infer", infer) for p in ("fp32", "int8")}
    return task, cfg(), results


def test_logged_metrics_equal_the_reference_evaluators_on_the_predictions_file(benchmarked):
    task, cfg, results = benchmarked
    runs = {r.data.tags["precision"]: r for r in find_runs(cfg.tracking, "tags.stage = 'infer'")}
    assert set(runs) == {"fp32", "int8"}
    for precision, result in results.items():
        logged = runs[precision].data.metrics
        assert logged["perf/qps"] > 0 and runs[precision].info.status == "FINISHED"
        if task == "msra_ner":
            from seqeval.metrics import f1_score, precision_score, recall_score

            rows = [json.loads(line) for line in open(result["predictions"], encoding="utf-8")]
            assert len(rows) == 120
            # every character is predicted, also in sentences longer than one 126-character window
            assert all(len(r["chars"]) == len(r["gold_tags"]) == len(r["predicted_tags"]) for r in rows)
            assert max(len(r["chars"]) for r in rows) > 126
            gold, pred = [r["gold_tags"] for r in rows], [r["predicted_tags"] for r in rows]
            assert logged["eval/f1"] == pytest.approx(100 * f1_score(gold, pred), abs=1e-6)
            assert logged["eval/precision"] == pytest.approx(100 * precision_score(gold, pred), abs=1e-6)
            assert logged["eval/recall"] == pytest.approx(100 * recall_score(gold, pred), abs=1e-6)
        else:
            from ernie_lab.metrics import cmrc_scores
            from ernie_lab.tasks.cmrc2018 import read_squad_json

            answers = json.load(open(result["predictions"], encoding="utf-8"))
            dev = read_squad_json(DATA_DIR / "cmrc2018" / "cmrc2018_dev.json")[:40]
            assert set(answers) == {q["id"] for q in dev}  # one answer per question, official format
            scores = cmrc_scores([q["answers"] for q in dev], [answers[q["id"]] for q in dev])
            assert logged["eval/em"] == pytest.approx(scores["em"], abs=1e-6)
            assert logged["eval/f1"] == pytest.approx(scores["f1"], abs=1e-6)
            assert logged["perf/qps_examples"] < logged["perf/qps"]  # several windows per question

