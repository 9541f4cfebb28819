"""The report's engine ranking: per task the fastest variant within the accuracy budget across all engines, and
the roofline figures beside each QPS."""
from __future__ import annotations

from ernie_lab.results import engine_ranking, seed_table, task_models, within_budget, write_report


def result(task, strategy, precision, qps, metric, label="", gflops=None, pct=None, model="m"):
    name = {"tnews": "accuracy", "msra_ner": "f1", "cmrc2018": "exact_match"}[task]
    out = {"task": task, "model": model, "strategy": strategy, "precision": precision, "device": "cpu", "runtime_label": label,
           "primary_metric": name, "perf/qps": qps, f"eval/{name}": metric}
    if gflops is not None:
        out["perf/gflops"] = gflops
    if pct is not None:
        out["perf/roofline_pct"] = pct
    return out


RESULTS = [
    result("tnews", "none", "fp32", 20.0, 57.0, gflops=60.0, pct=75.0),
    result("tnews", "ptq", "int8", 45.0, 56.0),                        # fastest overall, but 1 point lost
    result("tnews", "dynabert-w0.67", "fp32", 28.0, 56.7),
    result("tnews", "none", "fp32", 30.0, 57.0, label="openvino"),
    result("tnews", "none", "int8", 40.0, 56.6, label="openvino ptq", gflops=120.0, pct=80.0),
    result("tnews", "none", "int8", 35.0, 55.0, label="onnxruntime dynamic"),
    result("tnews", "none", "fp32", 22.0, 57.0, label="onnxruntime"),
    result("msra_ner", "none", "fp32", 10.0, 90.0),
    result("msra_ner", "ptq", "int8", 18.0, 89.8),
    result("msra_ner", "none", "int8", 15.0, 89.9, label="openvino ptq"),
]


def test_budget_is_measured_against_paddle_fp32():
    kept = within_budget(RESULTS, "tnews", 0.5)
    assert {(r["strategy"], r["precision"], r["runtime_label"]) for r in kept} == {
        ("none", "fp32", ""), ("dynabert-w0.67", "fp32", ""), ("none", "fp32", "openvino"),
        ("none", "int8", "openvino ptq"), ("none", "fp32", "onnxruntime")}


def test_engines_ranked_and_the_fastest_variant_named_per_task():
    text = engine_ranking(RESULTS, "m", 0.5)
    tnews = next(line for line in text.splitlines() if line.startswith("- TNEWS"))
    # Paddle INT8 (45 QPS) lost 1 point: out; OpenVINO INT8 (40 QPS, -0.4) wins; Paddle's best is pruned FP32
    assert tnews.index("OpenVINO 40.00 QPS (m+INT8 [openvino ptq]") < tnews.index("Paddle Inference 28.00 QPS") \
        < tnews.index("ONNX Runtime 22.00 QPS")
    assert "[120.0 GFLOP/s, 80%]" in tnews
    msra = next(line for line in text.splitlines() if line.startswith("- MSRA_NER"))
    assert msra.startswith("- MSRA_NER: Paddle Inference 18.00 QPS (m+INT8")


def test_seed_table_shows_roofline_beside_qps_and_report_has_the_ranking(tmp_path):
    md = seed_table(RESULTS, "m")
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()[2:]}
    assert "20.00 (1.0x) [60.0 GFLOP/s, 75%]" in rows["m+FP32"]
    assert "GFLOP/s" not in rows["m+INT8"]  # a run without the figures shows QPS alone
    text = write_report(RESULTS, tmp_path).read_text()
    assert "## Fastest within 0.5 point of FP32" in text and "- TNEWS: OpenVINO 40.00 QPS" in text


def test_report_names_each_model_where_tasks_used_different_ones(tmp_path):
    results = [result("tnews", "none", "fp32", 20.0, 50.0, model="e5-small-zh-l4"),
               result("msra_ner", "none", "fp32", 10.0, 30.0, model="e5-small-zh-l2"),
               result("msra_ner", "none", "int8", 25.0, 29.8, label="openvino ptq", model="e5-small-zh-l2")]
    assert task_models(results) == {"tnews": "e5-small-zh-l4", "msra_ner": "e5-small-zh-l2"}
    text = write_report(results, tmp_path).read_text()
    assert text.startswith("Models: TNEWS e5-small-zh-l4, MSRA_NER e5-small-zh-l2\n")
    assert "| FP32 | 20.00 (1.0x) | 50.00 |" in text and "| INT8 [openvino ptq] | - | - | 25.00 (2.5x)" in text
    single = write_report([r for r in results if r["task"] == "msra_ner"], tmp_path / "one").read_text()
    assert single.startswith("| variant") and "| e5-small-zh-l2+FP32 |" in single
