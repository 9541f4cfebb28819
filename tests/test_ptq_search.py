"""PTQ that chooses: a tiny ERNIE fine-tuned on real TNEWS lines, then `strategy=ptq quantize=search` over a 2x2
grid with the head kept in float, tracked in a temporary MLflow store. Asserts the choice follows the budget rule
over what was logged, the export is the chosen candidate, the head's matmul stays float, and a missed budget
fails naming every candidate (leaving the previous export in place)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ernie_lab import artifacts
from ernie_lab.errors import ConfigError
from ernie_lab.tracking import find_runs, tracked_run
from tests.conftest import RecordingRun, isolated_overrides, make_cfg

# A wide initialisation and a short, gentle fine-tune keep predictions spread over the classes, so INT8 candidates
# score differently; a model collapsed onto the majority class (what longer training on this little data gives)
# would tie every candidate.
TINY = [
    "model=tiny",
    "model.initializer_range=0.3",
    "task.data.limit.train=64",
    "task.data.limit.eval=32",
    "task.data.heldout_size=96",
    "train.epochs=1",
    "train.batch_size=16",
    "train.learning_rate=1e-4",
    "quantize.batch_size=8",
]
SEARCH = [
    "strategy=ptq",
    "quantize=search",
    "quantize.search.algos=[abs_max,hist]",
    "quantize.search.batch_nums=[1,2]",
    "quantize.search.eval_samples=64",
    "quantize.search.budget=3",
    "quantize.search.on_budget_miss=keep_best",
    "quantize.skip=[head]",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ptq_search")


def cfg_for(workdir, *extra):
    return make_cfg(isolated_overrides(workdir) + TINY + list(extra))


def compress_tracked(cfg):
    from ernie_lab import runtime
    from ernie_lab.compression.strategy import compress

    runtime.prepare(cfg.runtime)
    with tracked_run(cfg, "compress") as run:
        return compress(cfg, run), run.run_id


@pytest.fixture(scope="module")
def searched(workdir):
    from ernie_lab.training import finetune

    finetune(cfg_for(workdir), RecordingRun())
    manifest, run_id = compress_tracked(cfg_for(workdir, *SEARCH))
    return manifest, run_id


def best_within_budget(candidates, budget):
    """The rule, restated over the logged candidates: best metric within budget, else best overall."""
    pool = [c for c in candidates if c["drop"] <= budget] or candidates
    top = max(c["metric"] for c in pool)
    two_pass = ("hist", "KL")
    return min((c for c in pool if c["metric"] == top), key=lambda c: (c["samples"], c["algo"] in two_pass))


# ---- config and selection, no model -------------------------------------------------------------------------
def test_search_is_off_by_default_and_on_with_quantize_search(tmp_path):
    default = make_cfg(isolated_overrides(tmp_path))
    assert default.quantize.search.enabled is False and list(default.quantize.skip) == []
    search = make_cfg(isolated_overrides(tmp_path) + ["quantize=search"])
    assert search.quantize.search.enabled is True
    assert search.quantize.algo == default.quantize.algo and search.quantize.search.budget == 0.5
    assert search.quantize.search.on_budget_miss == "fail"


def candidate(name, algo, batch_nums, metric, reference=50.0, index=0):
    from ernie_lab.compression.ptq_search import Candidate

    return Candidate(name, algo, batch_nums, batch_nums * 8, index, metric=metric, drop=reference - metric)


def test_selection_takes_the_best_within_budget_and_breaks_ties_by_cheaper_calibration():
    from ernie_lab.compression.ptq_search import select

    cands = [
        candidate("hist-4", "hist", 4, 49.8, index=0),
        candidate("abs_max-4", "abs_max", 4, 49.8, index=1),  # same metric and size, one data pass
        candidate("hist-2", "hist", 2, 49.0, index=2),  # cheaper but 1.0 below the float model
        candidate("mse-8", "mse", 8, 51.0, index=3),  # best, but most samples
    ]
    assert select(cands, 0.5, "fail", "accuracy", 50.0).name == "mse-8"
    assert [c.within_budget for c in cands] == [True, True, False, True]
    assert select(cands[:3], 0.5, "fail", "accuracy", 50.0).name == "abs_max-4"
    assert select(cands[:3], 1.0, "fail", "accuracy", 50.0).name == "abs_max-4"
    smaller = candidate("hist-1", "hist", 1, 49.0, index=4)
    assert select([cands[2], smaller], 1.0, "fail", "accuracy", 50.0).name == "hist-1"


def test_budget_miss_fails_listing_every_candidate_or_keeps_the_best_with_a_warning(capsys):
    from ernie_lab.compression.ptq_search import BudgetMissError, select

    cands = [candidate("hist-4", "hist", 4, 48.0), candidate("KL-4", "KL", 4, 47.0, index=1)]
    with pytest.raises(BudgetMissError) as err:
        select(cands, 0.5, "fail", "accuracy", 50.0)
    message = str(err.value)
    assert "hist-4: accuracy 48.00 (drop +2.00)" in message and "KL-4: accuracy 47.00 (drop +3.00)" in message
    assert "quantize.search.budget=0.5" in message and "on_budget_miss=keep_best" in message
    assert isinstance(err.value, ConfigError)
    capsys.readouterr()
    assert select(cands, 0.5, "keep_best", "accuracy", 50.0).name == "hist-4"
    assert "warning" in capsys.readouterr().out


def test_refused_settings_name_the_value_and_the_choices(tmp_path):
    from ernie_lab.compression.ptq_search import grid

    def q(*overrides):
        return make_cfg(isolated_overrides(tmp_path) + ["quantize=search", *overrides]).quantize

    with pytest.raises(ConfigError, match=r"'avg' fails in paddleslim 2\.6.*hist, mse, KL, abs_max"):
        grid(q("quantize.search.algos=[hist,avg]"))
    with pytest.raises(ConfigError, match="quantize.search.on_budget_miss='maybe'.*fail, keep_best"):
        grid(q("quantize.search.on_budget_miss=maybe"))
    with pytest.raises(ConfigError, match="batch_nums"):
        grid(q("quantize.search.batch_nums=[0,4]"))
    with pytest.raises(ConfigError, match="quantize.search.budget='half'"):
        grid(q("quantize.search.budget=half"))
    names = [c.name for c in grid(q("quantize.search.algos=[mse,mse,KL]", "quantize.search.batch_nums=[2,4]"))]
    assert names == ["mse-2x16", "KL-2x16", "mse-4x16", "KL-4x16"]


def test_calibration_and_scoring_slices_are_disjoint_and_a_small_heldout_is_refused(tmp_path):
    from ernie_lab.compression.ptq_search import grid, split_heldout

    cfg = make_cfg(isolated_overrides(tmp_path) + TINY + SEARCH)
    heldout = [{"id": i} for i in range(96)]
    cal, scored = split_heldout(cfg, heldout, grid(cfg.quantize))
    assert [e["id"] for e in cal] == list(range(16)) and [e["id"] for e in scored] == list(range(32, 96))
    with pytest.raises(ConfigError, match=r"task\.data\.heldout_size \(now 96\).*task\.data\.limit\.heldout"):
        split_heldout(cfg, heldout[:79], grid(cfg.quantize))


def test_skip_names_the_head_weight_and_lists_valid_layers(tmp_path):
    from ernie_lab.compression.quantize import skip_tensor_names
    from ernie_lab.modeling import build_model

    cfg = make_cfg(isolated_overrides(tmp_path) + ["model=tiny"])
    from paddlenlp.transformers import ErnieForTokenClassification

    model = build_model(cfg.model, ErnieForTokenClassification, {"num_labels": 7})
    assert skip_tensor_names(model, ["head"]) == [model.classifier.weight.name]
    assert skip_tensor_names(model, []) == []
    layer = "ernie.encoder.layers.0.linear2"
    assert skip_tensor_names(model, ["head", layer, "classifier"]) == [
        model.classifier.weight.name, model.ernie.encoder.layers[0].linear2.weight.name]
    with pytest.raises(ConfigError, match=r"quantize\.skip entry='pooler'.*head, .*classifier"):
        skip_tensor_names(model, ["pooler"])


# ---- the search on a fine-tuned tiny model ---------------------------------------------------------------------
def test_search_exports_the_best_candidate_within_budget_and_records_every_candidate(workdir, searched):
    manifest, _ = searched
    cal = manifest["calibration"]
    summary = cal["search"]
    cands = summary["candidates"]
    assert [c["name"] for c in cands] == ["abs_max-1x8", "hist-1x8", "abs_max-2x8", "hist-2x8"]
    reference = summary["reference"]["metric"]
    for c in cands:
        assert 0 <= c["metric"] <= 100 and c["calibration_seconds"] > 0
        assert c["drop"] == pytest.approx(reference - c["metric"])
        assert c["within_budget"] == (c["drop"] <= 3)
        assert c["scores"]["accuracy"] == c["metric"]
    chosen = best_within_budget(cands, 3)
    assert summary["chosen"] == chosen["name"] and summary["chosen_within_budget"] == chosen["within_budget"]
    assert (cal["algo"], cal["batch_nums"], cal["samples"]) == (chosen["algo"], chosen["batch_nums"], chosen["samples"])
    assert summary["calibration_examples"] == 16 and summary["eval_examples"] == 64
    assert summary["primary_metric"] == "accuracy" and summary["budget"] == 3
    export = artifacts.export_dir(cfg_for(workdir), "ptq")
    assert {p.name for p in export.iterdir() if p.is_dir()} == set()  # no float/ or candidate leftovers
    assert artifacts.read_manifest(export, "compress")["calibration"]["search"]["chosen"] == chosen["name"]


def test_the_export_is_the_chosen_candidate(workdir, searched):
    """Scored the same way again, the exported files give the chosen candidate's held-out metric."""
    from omegaconf import OmegaConf

    from ernie_lab.compression.ptq_search import HeldoutScorer
    from ernie_lab.modeling import build_tokenizer
    from ernie_lab.tasks import build_task

    summary = searched[0]["calibration"]["search"]
    cfg = cfg_for(workdir, *SEARCH)
    task = build_task(cfg.task, build_tokenizer(cfg.model))
    scored = task.load("heldout")[-64:]
    runtime = OmegaConf.to_container(cfg.runtime, resolve=True)
    score = HeldoutScorer(task, scored, runtime, int(cfg.benchmark.batch_size))
    (chosen,) = [c for c in summary["candidates"] if c["name"] == summary["chosen"]]
    assert score(artifacts.export_dir(cfg, "ptq"), "int8")["accuracy"] == chosen["metric"]


def test_search_is_logged_to_mlflow_per_candidate_and_for_the_choice(workdir, searched):
    from mlflow.tracking import MlflowClient

    manifest, run_id = searched
    summary = manifest["calibration"]["search"]
    client = MlflowClient(tracking_uri=cfg_for(workdir).tracking.tracking_uri)
    history = sorted(client.get_metric_history(run_id, "ptq_search/heldout_metric"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in history] == pytest.approx([c["metric"] for c in summary["candidates"]])
    drops = sorted(client.get_metric_history(run_id, "ptq_search/heldout_drop"), key=lambda m: m.step)
    assert [m.value for m in drops] == pytest.approx([c["drop"] for c in summary["candidates"]])
    (chosen,) = [c for c in summary["candidates"] if c["name"] == summary["chosen"]]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["ptq/heldout_metric"] == pytest.approx(chosen["metric"])
    assert metrics["ptq/heldout_drop"] == pytest.approx(chosen["drop"])
    path = client.download_artifacts(run_id, "ptq_search.json", str(workdir))
    logged = json.loads(open(path, encoding="utf-8").read())
    assert logged["chosen"] == summary["chosen"] and len(logged["candidates"]) == 4


def linear_matmuls(model_dir):
    """Each linear layer's matmul in an exported program, in program order: its weight, whether it is marked
    skip_quant, which op makes the weight input it reads, and the stored weight values."""
    import paddle

    paddle.enable_static()
    try:
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            executor = paddle.static.Executor(paddle.CPUPlace())
            program, _, _ = paddle.static.load_inference_model(str(model_dir / "model"), executor)
            ops = program.global_block().ops
            producers = {out: op.type for op in ops for out in op.output_arg_names}
            rows = []
            for op in ops:
                read = op.input("Y")[0] if op.type == "matmul_v2" else ""
                if not read.startswith("linear_"):  # attention's QK^T and PV read activations, not weights
                    continue
                weight = read.removesuffix(".quantized.dequantized")
                rows.append({
                    "weight": weight,
                    "skip_quant": op.has_attr("skip_quant") and bool(op.attr("skip_quant")),
                    "producer": producers.get(read),
                    "values": np.array(scope.find_var(weight).get_tensor()),
                })
            return rows
    finally:
        paddle.disable_static()


def is_int8_valued(values):
    return np.array_equal(values, np.round(values)) and np.abs(values).max() <= 127


def test_skip_head_keeps_the_head_matmul_float_and_quantizes_the_others(workdir, searched):
    (head_weight,) = searched[0]["calibration"]["skip_tensors"]
    *others, head = linear_matmuls(artifacts.export_dir(cfg_for(workdir), "ptq"))
    assert head["weight"] == head_weight  # the classifier is the model's last linear layer
    assert head["skip_quant"] and head["producer"] is None  # reads its stored weight, no dequantize op between
    assert head["values"].dtype == np.float32 and head["values"].shape == (64, 15)
    assert not is_int8_valued(head["values"])
    assert len(others) == 2 * 6 + 1  # per layer q, k, v, out, ffn1, ffn2; plus the pooler
    for row in others:
        assert not row["skip_quant"] and row["producer"] == "dequantize_linear" and is_int8_valued(row["values"])


def test_without_search_or_skip_ptq_calibrates_once_and_quantizes_the_head_too(workdir, searched, tmp_path):
    import shutil

    source = artifacts.finetuned_dir(cfg_for(workdir))
    cfg = make_cfg(isolated_overrides(tmp_path) + TINY + ["strategy=ptq", "quantize.batch_nums=2"])
    shutil.copytree(source, artifacts.finetuned_dir(cfg))
    manifest, _ = compress_tracked(cfg)
    cal = manifest["calibration"]
    assert (cal["algo"], cal["samples"], cal["skip_tensors"]) == ("hist", 16, [])
    assert cal["search"]["enabled"] is False and "candidates" not in cal["search"]
    rows = linear_matmuls(artifacts.export_dir(cfg, "ptq"))
    assert len(rows) == 14 and all(r["producer"] == "dequantize_linear" and is_int8_valued(r["values"]) for r in rows)


def test_a_missed_budget_fails_naming_every_candidate_and_keeps_the_previous_export(workdir, searched):
    from ernie_lab.compression.ptq_search import BudgetMissError

    manifest = searched[0]
    first = {c["name"]: c for c in manifest["calibration"]["search"]["candidates"]}
    # Below every drop these two candidates showed (calibration and INT8 scoring are deterministic).
    budget = min(-1.0, first["abs_max-1x8"]["drop"] - 1, first["hist-1x8"]["drop"] - 1)
    cfg = cfg_for(workdir, *SEARCH, "quantize.search.batch_nums=[1]", f"quantize.search.budget={budget}",
                  "quantize.search.on_budget_miss=fail")
    with pytest.raises(BudgetMissError) as err:
        compress_tracked(cfg)
    message = str(err.value)
    for name in ("abs_max-1x8", "hist-1x8"):
        assert f"{name}: accuracy {first[name]['metric']:.2f} (drop {first[name]['drop']:+.2f})" in message
    assert f"quantize.search.budget={budget}" in message
    export = artifacts.export_dir(cfg, "ptq")
    assert artifacts.read_manifest(export, "compress")["created_at"] == manifest["created_at"]
    (failed,) = [r for r in find_runs(cfg.tracking, "tags.stage = 'compress'") if r.info.status == "FAILED"]
    assert not math.isnan(failed.data.metrics["ptq_search/heldout_drop"])  # the candidates are logged before failing
