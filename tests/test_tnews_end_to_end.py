"""Tiny ERNIE on a few hundred real TNEWS lines through finetune -> export/PTQ -> infer, tracked in a temporary
MLflow store. Asserts what a broken implementation would fail: the loss falls, the export matches dygraph,
INT8 agrees with FP32, infer logs QPS and accuracy and writes one prediction per dev example."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ernie_lab import artifacts
from ernie_lab.tracking import find_runs
from tests.conftest import isolated_overrides, make_cfg, run_stage, task_for

TINY = [
    "model=tiny",
    "task.data.limit.train=256",
    "task.data.limit.eval=256",
    "task.data.heldout_size=64",
    "train.epochs=10",
    "train.batch_size=16",
    "train.learning_rate=3e-3",
    "quantize.batch_size=8",
    "quantize.batch_nums=4",
    "benchmark.warmup_batches=1",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tnews")


def cfg_for(workdir, *extra):
    return make_cfg(isolated_overrides(workdir) + TINY + list(extra))


@pytest.fixture(scope="module")
def trained(workdir):
    from ernie_lab.training import finetune

    return run_stage(cfg_for(workdir), "train", finetune)


@pytest.fixture(scope="module")
def compressed(workdir, trained):
    from ernie_lab.compression.strategy import compress

    return {s: run_stage(cfg_for(workdir, f"strategy={s}"), "compress", compress) for s in ("none", "ptq")}


def test_training_loss_falls_and_best_checkpoint_is_saved(workdir, trained):
    assert trained["loss_last"] < trained["loss_first"] - 0.3, trained
    ckpt = artifacts.finetuned_dir(cfg_for(workdir))
    assert (ckpt / "config.json").is_file() and (ckpt / "model_state.pdparams").is_file()
    state = json.loads((ckpt / "training_state.json").read_text())
    assert state["best"]["metric"] == pytest.approx(trained["metric"])


def test_training_logs_its_gflops_and_share_of_the_fp32_peak(workdir, trained):
    from ernie_lab.inference import roofline
    from ernie_lab.tracking import find_runs

    (run,) = find_runs(cfg_for(workdir).tracking, "tags.stage = 'train'")
    metrics = run.data.metrics
    assert metrics["train/gflops"] > 0 and 0 < metrics["train/roofline_pct"] <= 100
    # three forward passes' worth of FLOPs per step, on batches of at most 16 titles of at most max_seq_length tokens
    cfg = cfg_for(workdir)
    shapes = roofline.model_shapes(cfg.model, {}, task_for(cfg))
    most = 3 * roofline.pass_flops(shapes, [(16, int(cfg.task.max_seq_length))]) / 1e9
    assert 0 < metrics["train/gflop_per_step"] <= most
    assert float(run.data.params["roofline.train_peak_fp32_gflops"]) > 0


def test_exports_carry_a_manifest_and_match_dygraph(workdir, compressed):
    none, ptq = compressed["none"], compressed["ptq"]
    assert none["weights"] == "float" and ptq["weights"] == "int8"
    assert none["export_check"]["max_abs_diff"] < 1e-4
    cal = ptq["calibration"]
    assert cal["split"] == "heldout" and cal["samples"] == 32 and cal["algo"] == "hist"
    for key in ("task", "model", "strategy", "source_checkpoint", "library_versions", "created_at"):
        assert ptq[key]
    on_disk = artifacts.read_manifest(artifacts.export_dir(cfg_for(workdir), "ptq"), "compress")
    assert on_disk["strategy"] == "ptq"


def test_calibration_never_touches_the_eval_split(workdir):
    from ernie_lab.modeling import build_tokenizer
    from ernie_lab.tasks import build_task

    cfg = cfg_for(workdir, "task.data.limit.train=null", "task.data.limit.eval=null", "task.data.heldout_size=2000")
    task = build_task(cfg.task, build_tokenizer(cfg.model))
    train, heldout = task.load("train"), task.load("heldout")
    assert len(heldout) == 2000 and len(train) == 53360 - 2000
    assert not {ex["id"] for ex in heldout} & {ex["id"] for ex in train}


def test_int8_predictions_agree_with_fp32_and_both_are_tracked(workdir, compressed):
    from ernie_lab.inference.benchmark import infer

    results = {p: run_stage(cfg_for(workdir, f"precision={p}"), "infer", infer) for p in ("fp32", "int8")}
    fp32, int8 = results["fp32"], results["int8"]
    for r in results.values():
        assert r["perf/qps"] > 0 and 0 <= r["eval/accuracy"] <= 100
        lines = open(r["predictions"], encoding="utf-8").read().splitlines()
        assert len(lines) == 256
    pred32 = [json.loads(l)["label"] for l in open(fp32["predictions"], encoding="utf-8")]
    pred8 = [json.loads(l)["label"] for l in open(int8["predictions"], encoding="utf-8")]
    # oneDNN's INT8 kernels add their own error on CPUs without VNNI (s16 intermediate sums on AVX2): 68-72% on
    # this tiny, barely trained model there; the quantized model itself is checked tightly below.
    assert np.mean([a == b for a, b in zip(pred32, pred8)]) >= 0.6
    runs = find_runs(cfg_for(workdir).tracking, "tags.stage = 'infer'")
    assert {r.data.tags["precision"] for r in runs} == {"fp32", "int8"}
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.metrics["perf/qps"] > 0 and "eval/accuracy" in r.data.metrics
        assert r.data.params["model.name"] == "tiny"
        assert "random" in r.data.tags["weights_note"]


def test_quantized_model_simulated_in_float_matches_fp32(workdir, compressed):
    """The PTQ output itself (scales + int8 weights, run as fake-quant in float) must track the FP32 model."""
    from omegaconf import OmegaConf

    from ernie_lab.inference.engine import measure_isolated

    cfg = cfg_for(workdir)
    feeds = eval_feeds(cfg, 96)
    runtime = {**OmegaConf.to_container(cfg.runtime, resolve=True), "onednn": False}
    ref = measure_isolated(artifacts.export_dir(cfg, "none"), runtime, "fp32", feeds, 0, 1)["outputs"]
    sim = measure_isolated(artifacts.export_dir(cfg, "ptq"), runtime, "fp32", feeds, 0, 1)["outputs"]
    ref_logits, sim_logits = np.concatenate([o[0] for o in ref]), np.concatenate([o[0] for o in sim])
    assert np.mean(ref_logits.argmax(1) == sim_logits.argmax(1)) >= 0.95
    assert np.abs(ref_logits - sim_logits).max() < 0.2 * np.abs(ref_logits).max()


def eval_feeds(cfg, n):
    from ernie_lab.modeling import build_tokenizer
    from ernie_lab.tasks import build_task

    task = build_task(cfg.task, build_tokenizer(cfg.model))
    features = task.featurize(task.load("eval")[:n], training=False)
    return [task.collate(features[i : i + 32]) for i in range(0, n, 32)]


def test_int8_evaluations_in_one_parent_process_do_not_interfere(workdir, compressed):
    """Each evaluation runs in a fresh child process: the same INT8 model gives identical outputs twice."""
    from omegaconf import OmegaConf

    from ernie_lab.inference.engine import measure_isolated

    cfg = cfg_for(workdir, "precision=int8")
    feeds = eval_feeds(cfg, 96)
    model_dir = artifacts.export_dir(cfg, "ptq")
    runtime = OmegaConf.to_container(cfg.runtime, resolve=True)
    first = measure_isolated(model_dir, runtime, "int8", feeds, 1, 1)["outputs"]
    second = measure_isolated(model_dir, runtime, "int8", feeds, 1, 1)["outputs"]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a[0], b[0])


def test_int8_model_asked_for_fp32_is_refused(workdir, compressed):
    from ernie_lab.errors import ConfigError
    from ernie_lab.artifacts import resolve_export

    with pytest.raises(ConfigError, match="INT8"):
        resolve_export(cfg_for(workdir, "strategy=ptq", "precision=fp32"))
    directory, manifest = resolve_export(cfg_for(workdir, "strategy=none", "precision=int8"))
    assert manifest["strategy"] == "ptq" and directory.name == "ptq"


def test_missing_export_names_the_command_that_makes_it(tmp_path):
    from ernie_lab.errors import MissingArtifactError
    from ernie_lab.artifacts import resolve_export

    cfg = make_cfg(isolated_overrides(tmp_path) + ["model=tiny", "precision=int8"])
    with pytest.raises(MissingArtifactError, match="python compress.py task=tnews model=tiny strategy=ptq"):
        resolve_export(cfg)


def test_infer_multirun_logs_one_run_per_precision_and_a_closing_table(workdir, compressed):
    from tests.conftest import run_script

    result = run_script("infer.py", "-m", "precision=fp32,int8", *TINY, tmp=workdir, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tiny+FP32" in result.stdout and "tiny+INT8" in result.stdout and "x)" in result.stdout
    tracking = cfg_for(workdir).tracking
    (parent,) = [r for r in find_runs(tracking, "tags.stage = 'sweep'") if r.info.status == "FINISHED"]
    children = find_runs(tracking, f"tags.sweep_id = '{parent.info.run_id}' and tags.stage = 'infer'")
    assert sorted(r.data.tags["precision"] for r in children) == ["fp32", "int8"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["perf/qps"] > 0 for r in children)
