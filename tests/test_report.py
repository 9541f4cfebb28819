"""The report: the seed-shaped table and Pareto charts, built from MLflow runs of a sweep, by one command."""
from __future__ import annotations

import os
import subprocess
import sys

from omegaconf import OmegaConf

from ernie_lab.config import PROJECT_ROOT
from ernie_lab.results import engine_comparison, pareto_front, seed_table, variant_name
from tests.conftest import isolated_overrides


def result(task, strategy, precision, qps, metric, device="cpu", label=""):
    name = {"tnews": "accuracy", "msra_ner": "f1", "cmrc2018": "exact_match"}[task]
    return {"task": task, "strategy": strategy, "precision": precision, "device": device, "runtime_label": label,
            "primary_metric": name, "perf/qps": qps, f"eval/{name}": metric}


def test_variant_names_follow_the_seed_rows():
    assert variant_name("m", "none", "fp32") == "m+FP32"
    assert variant_name("m", "ptq", "int8") == "m+INT8"
    assert variant_name("m", "dynabert_ptq-w0.67", "int8") == "m+pruned(w0.67)+INT8"
    assert variant_name("m", "none", "int8", "onnxruntime dynamic") == "m+INT8 [onnxruntime dynamic]"


def test_seed_table_speedups_and_deltas_are_against_the_same_device_fp32():
    results = [
        result("tnews", "none", "fp32", 100.0, 57.0),
        result("tnews", "ptq", "int8", 250.0, 56.5),
        result("tnews", "dynabert-w0.67", "fp32", 150.0, 57.2),
        result("tnews", "none", "int8", 120.0, 56.0, label="onnxruntime dynamic"),
        result("tnews", "none", "fp32", 1000.0, 57.0, device="gpu"),
        result("tnews", "none", "fp16", 2000.0, 57.0, device="gpu"),
        result("tnews", "ptq", "int8", 3000.0, 56.9, device="gpu"),
    ]
    md = seed_table(results, "m")
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()[2:]}
    assert "250.00 (2.5x)" in rows["m+INT8"] and "56.50 (-0.50)" in rows["m+INT8"]
    assert "150.00 (1.5x)" in rows["m+pruned(w0.67)+FP32"] and "(+0.20)" in rows["m+pruned(w0.67)+FP32"]
    assert "120.00 (1.2x)" in rows["m+INT8 [onnxruntime dynamic]"]
    assert "3000.00 (3.0x) (1.5x vs FP16)" in rows["m+INT8 (GPU)"]
    assert "1000.00 (1.0x)" in rows["m+FP32 (GPU)"]


def test_engine_comparison_names_the_ratio_of_best_int8_rows():
    results = [result("tnews", "ptq", "int8", 250.0, 56.5), result("tnews", "dynabert_ptq-w0.67", "int8", 400.0, 56.0),
               result("tnews", "none", "int8", 100.0, 56.2, label="onnxruntime dynamic"),
               result("tnews", "none", "int8", 160.0, 56.4, label="onnxruntime static")]
    text = engine_comparison(results)
    assert "400.00 QPS vs onnxruntime static (none) 160.00 QPS = 2.50x" in text


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 57.0), (250, 56.5), (150, 56.0), (400, 56.0), (90, 58.0)]
    assert pareto_front(points) == [4, 0, 1, 3]


def test_report_command_reads_a_sweep_from_mlflow_and_writes_table_and_charts(tmp_path):
    from ernie_lab.tracking import find_runs, start_parent_run, tracked_run
    from tests.conftest import make_cfg

    cfg = make_cfg(isolated_overrides(tmp_path) + ["model=tiny"])
    parent = start_parent_run(cfg, "sweep-infer")
    for task, strategy, precision, qps, acc in [("tnews", "none", "fp32", 100.0, 40.0), ("tnews", "none", "int8", 180.0, 39.5),
                                                ("msra_ner", "none", "fp32", 50.0, 80.0)]:
        run_cfg = make_cfg(isolated_overrides(tmp_path) + ["model=tiny", f"task={task}", f"precision={precision}"])
        with tracked_run(run_cfg, "infer", parent_run_id=parent.run_id) as run:
            metric = "accuracy" if task == "tnews" else "f1"
            run.set_tags({"export_strategy": "ptq" if precision == "int8" else strategy, "primary_metric": metric})
            run.log_metrics({"perf/qps": qps, f"eval/{metric}": acc})
    parent.client.set_terminated(parent.run_id, "FINISHED")

    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "ernie_lab.report", f"report.output_dir={out}", *isolated_overrides(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    md = (out / "results.md").read_text()
    assert "tiny+INT8" in md and "180.00 (1.8x)" in md and "39.50 (-0.50)" in md and "MSRA_NER f1" in md
    for task in ("tnews", "msra_ner"):
        png = out / f"pareto_{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    tracking = OmegaConf.create({"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "ernie-lab"})
    (logged,) = find_runs(tracking, "tags.stage = 'sweep'")
    names = {a.path for a in parent.client.list_artifacts(logged.info.run_id, "report")}
    assert names == {"report/pareto_tnews.png", "report/pareto_msra_ner.png"}


def test_report_without_any_sweep_says_what_to_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ernie_lab.report", *isolated_overrides(tmp_path)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no finished sweep" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
