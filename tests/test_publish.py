"""results/<experiment>/: the seed's table beside ours, accuracy cost per variant, the CSV, the gzip'd predictions."""
from __future__ import annotations

import csv
import gzip

from ernie_lab.publish import publish

METRICS = {"tnews": "accuracy", "msra_ner": "f1", "cmrc2018": "exact_match"}


def result(tmp, task, strategy, precision, qps, value, label=""):
    path = tmp / "artifacts" / task / f"{strategy}_{precision}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{{"{task}": "{strategy} {precision}"}}')
    return {"task": task, "model": "m", "strategy": strategy, "precision": precision, "runtime_label": label,
            "primary_metric": METRICS[task], "perf/qps": qps, f"eval/{METRICS[task]}": value, "eval_examples": "100",
            "predictions": str(path), "run_id": f"{task}-{strategy}-{precision}"}


def test_publication_puts_our_figures_beside_the_seeds_and_keeps_every_prediction(tmp_path):
    results = []
    for task, base in [("tnews", 56.0), ("msra_ner", 91.0), ("cmrc2018", 60.0)]:
        results += [result(tmp_path, task, "none", "fp32", 100.0, base),
                    result(tmp_path, task, "none", "int8", 300.0, base - 0.3, "openvino"),
                    result(tmp_path, task, "dynabert-w0.67", "fp32", 150.0, base - 0.9),
                    result(tmp_path, task, "dynabert-w0.67", "int8", 450.0, base - 1.2, "openvino"),
                    result(tmp_path, task, "none", "bf16", 200.0, base)]
    out = tmp_path / "results" / "converged"
    report = publish(results, out, ["# experiment=converged", "- CPU: test"], {"tnews": {"train": 120.0}}, [])
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 15
    int8 = next(r for r in rows if r["task"] == "msra_ner" and r["precision"] == "int8" and r["strategy"] == "none")
    assert int8["engine"] == "openvino" and float(int8["speedup_vs_fp32"]) == 3.0
    assert abs(float(int8["delta_vs_fp32"]) + 0.3) < 1e-9
    for row in rows:  # every prediction file, byte for byte
        source = next(r["predictions"] for r in results if r["run_id"] == row["run_id"])
        assert gzip.decompress((out / row["predictions"]).read_bytes()) == open(source, "rb").read()
    text = report.read_text()
    costs = text.split("## Accuracy lost against FP32")[1]
    # INT8: 0.30 on each task, average 0.30 against the seed's (0.88 + 0.40 + 0.72) / 3 = 0.67
    assert "| INT8 | 0.30 (0.88) | 0.30 (0.40) | 0.30 (0.72) | 0.30 (0.67) | 0.30 |" in costs
    assert "| pruned INT8 | 1.20 (0.76) | 1.20 (0.65) | 1.20 (3.48) | 1.20 (1.63) | 1.20 |" in costs
    beside = text.split("## Beside the seed's CPU table")[1]
    assert "| INT8 | 3.0x (1.9x) | 55.70 (56.57) |" in beside
    assert "| tnews | 2.00 | 0.00 | 0.00 | 2.00 |" in text  # 120 training minutes, in hours


def test_a_task_fingerprint_holds_in_another_clone_and_changes_with_a_setting(tmp_path):
    """A task published in one checkout is carried in a clone elsewhere (other absolute paths, same data beside
    it), not when a training, compression or benchmark setting differs."""
    from hydra import compose, initialize_config_dir

    from ernie_lab.config import CONF_DIR
    from ernie_lab.stages import task_fingerprint

    def fingerprint(*overrides: str) -> str:
        base = ["experiment=converged", "task=tnews", *overrides]
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="pipeline", overrides=base)
            compress = [compose(config_name="pipeline", overrides=[*base, f"strategy={s}"])
                        for s in cfg.pipeline.strategies]
            return task_fingerprint(cfg, compress, [list(v) for v in cfg.pipeline.variants])

    here = fingerprint()
    assert fingerprint(f"paths.root_dir={tmp_path / 'clone'}") == here
    assert fingerprint("train.save_every_steps=7", "train.threads=1") == here  # change nothing computed
    for changed in ("train.learning_rate=3e-5", "prune.train.max_steps=5", "benchmark.batch_size=16",
                    "quantize.algo=mse", "pipeline.variants=[[none,fp32]]"):
        assert fingerprint(changed) != here, changed


def test_the_report_shows_each_tasks_selection_curve_and_a_carried_task_keeps_it(tmp_path):
    from ernie_lab.publish import carried_task, write_task_record

    results = [result(tmp_path, "msra_ner", "none", "fp32", 100.0, 88.0)]
    selection = {"split": "held-out (2000 train examples)", "metric": "f1", "best": {"step": 1383, "metric": 82.875},
                 "history": [{"epoch": 0, "step": 1000, "f1": 81.4226, "precision": 81.1},
                             {"epoch": 0, "step": 1383, "f1": 82.875, "precision": 80.6}]}
    out = tmp_path / "results"
    report = publish(results, out, ["# x"], {"msra_ner": {"train": 60.0}}, [], selections={"msra_ner": selection})
    section = report.read_text().split("## Fine-tuning: the selection metric at each evaluation")[1]
    assert ("| MSRA_NER | held-out (2000 train examples) | f1 | 1000: 81.42, 1383: 82.88 | 82.88 at step 1383 |"
            in section)
    write_task_record(out, "msra_ner", "fp", results, {"train": 60.0}, {"cpu": "c"}, selection)
    assert carried_task(out, "msra_ner", "fp")["selection"] == selection
    assert "## Fine-tuning" not in publish(results, tmp_path / "bare", ["# x"], {}, []).read_text()


def test_a_second_phase_that_kept_its_start_says_so_in_the_report(tmp_path):
    from ernie_lab.pipeline import selection_curve
    from tests.conftest import isolated_overrides, make_cfg

    cfg = make_cfg(["model=tiny", "task=msra_ner", *isolated_overrides(tmp_path)])
    first = selection_curve(cfg, {"metric": 92.18, "step": 4149, "history": [{"step": 4149, "f1": 92.18}]}, None)
    kept = {"metric": 92.18, "step": 4149, "kept_from": "/a/phase1", "history": [{"step": 1000, "f1": 91.69}]}
    second = selection_curve(cfg, kept, None)
    assert second["best"] == {"step": 4149, "metric": 92.18, "kept_start": True}
    results = [result(tmp_path, "msra_ner", "none", "fp32", 100.0, 92.0)]
    report = publish(results, tmp_path / "results", ["# x"], {}, [],
                     selections={"msra_ner": {**second, "first_phase": first}}).read_text()
    assert "| MSRA_NER, phase 1 | held-out (2000 train examples) | f1 | 4149: 92.18 | 92.18 at step 4149 |" in report
    assert ("| MSRA_NER, phase 2 (from phase 1's best) | held-out (2000 train examples) | f1 | 1000: 91.69 | "
            "92.18, its start's (step 4149 there), kept: no evaluation here beat it |") in report


def test_a_training_recorded_without_its_curve_gets_it_from_its_mlflow_run(tmp_path):
    """Trainings that ran before a result carried its evaluations (the converged MSRA_NER run) logged them as
    selection_history.json in their MLflow run; the publication reads them there."""
    from ernie_lab.pipeline import selection_curve
    from ernie_lab.tracking import tracked_run
    from tests.conftest import isolated_overrides, make_cfg

    cfg = make_cfg(["model=tiny", "task=msra_ner", *isolated_overrides(tmp_path)])
    history = [{"epoch": 0, "step": 10, "f1": 40.0}, {"epoch": 1, "step": 20, "f1": 55.5}]
    with tracked_run(cfg, "train") as run:
        run.log_dict({"history": history, "best": {"metric": 55.5, "step": 20}}, "selection_history.json")
    old_result = {"checkpoint": "x", "metric": 55.5, "step": 20, "epoch": 1}
    curve = selection_curve(cfg, old_result, run.run_id)
    assert curve["history"] == history and curve["metric"] == "f1" and curve["best"] == {"step": 20, "metric": 55.5}
    assert curve["split"] == "held-out (2000 train examples)"  # conf/task/msra_ner.yaml selects on train's held-out slice
    assert selection_curve(cfg, old_result, "0" * 32)["history"] == []  # a run that is gone: no curve, no crash
    assert selection_curve(cfg, {**old_result, "history": history[:1]}, None)["history"] == history[:1]
