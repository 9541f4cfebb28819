"""The main job end to end (python -m ernie_lab.pipeline), shrunk to a tiny model and one task."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from ernie_lab.config import PROJECT_ROOT
from ernie_lab.errors import ConfigError
from ernie_lab.tracking import find_runs
from tests.conftest import isolated_overrides


def test_pipeline_trains_compresses_benchmarks_and_writes_the_table(tmp_path):
    overrides = [
        "model=tiny", "pipeline.tasks=[tnews]", "pipeline.int8_runtime=cpu",  # Paddle INT8 on any CPU
        "pipeline.variants=[[none,fp32],[none,int8],[dynabert,fp32],[dynabert,int8]]",
        "quickstart.tnews.max_steps=16", "quickstart.tnews.train_limit=256",
        "quickstart.tnews.prune_steps=4", "prune.importance.samples=32", "prune.eval_samples=32",
        "task.data.limit.eval=128", "task.data.limit.heldout=64", "benchmark.warmup_batches=1",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "ernie_lab.pipeline", *overrides, *isolated_overrides(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (table,) = (tmp_path / "outputs" / "runs" / "pipeline").glob("*/results.md")
    text = table.read_text()
    assert "tiny+FP32" in text and "tiny+INT8" in text and "TNEWS accuracy" in text
    assert "tiny+pruned(w0.67)+FP32" in text and "tiny+pruned(w0.67)+INT8" in text
    # FP32 rows named no runtime: runtime=auto picked Paddle Inference, and the report says why
    assert "## Engines picked by runtime=auto\n- FP32 on Paddle Inference: " in text, text
    # the time each stage took, per task, is in the report and on the parent run: nobody copies it by hand
    (tnews_times,) = [line for line in text.splitlines() if line.startswith("| tnews |")]
    train_min, compress_min, infer_min, total_min = (float(x) for x in tnews_times.strip("| ").split(" | ")[1:])
    assert train_min > 0 and compress_min > 0 and infer_min > 0
    assert abs(total_min - (train_min + compress_min + infer_min)) <= 0.02
    tracking = OmegaConf.create({"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "ernie-lab"})
    (parent,) = find_runs(tracking, "tags.stage = 'sweep'")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["time/tnews_minutes"] == total_min
    children = find_runs(tracking, f"tags.sweep_id = '{parent.info.run_id}' and tags.stage != 'sweep'")
    stages = sorted(r.data.tags["stage"] for r in children)
    assert stages == ["compress"] * 4 + ["infer"] * 4 + ["train"]
    assert all(r.info.status == "FINISHED" for r in children)


def test_int8_rows_run_where_int8_keeps_accuracy_and_unread_int8_exports_are_not_built(monkeypatch):
    from hydra import initialize_config_dir

    from ernie_lab import pipeline, runtime
    from tests.conftest import make_cfg

    variants = [pipeline.Variant(s, p, (), False)
                for s, p in [("none", "fp32"), ("none", "int8"), ("dynabert", "fp32"), ("dynabert", "int8")]]
    strategies = ["none", "ptq", "dynabert", "dynabert_ptq"]
    # on the default runtime=auto each INT8 row gets runtime=auto's pick, with its reason; on runtime=cpu the same rule
    assert pipeline.int8_runtime(make_cfg([], config_name="pipeline")) is None
    for flags, expected in [({"avx2", "avx512_vnni"}, "openvino"), ({"avx2"}, "onnxruntime")]:
        monkeypatch.setattr(runtime, "cpu_flag_set", lambda flags=flags: set(flags))
        assert runtime.auto_runtime("int8", gpu=False)[0] == expected
        assert pipeline.int8_runtime(make_cfg(["runtime=cpu"], config_name="pipeline")) == expected
    assert pipeline.int8_runtime(make_cfg(["pipeline.int8_runtime=cpu"], config_name="pipeline")) == "cpu"  # forced
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        # Paddle INT8 reads the ptq exports; ONNX Runtime quantizes the float ones itself
        assert pipeline.needed_strategies(strategies, *pipeline.strategies_read(strategies, variants, [])) == strategies
        ort = [pipeline.Variant(v.strategy, v.precision, ("runtime=onnxruntime",), True)
               if v.precision == "int8" else v for v in variants]
        assert pipeline.needed_strategies(strategies, *pipeline.strategies_read(strategies, ort, [])) == ["none", "dynabert"]
        mixed = [ort[1], variants[3]]  # ORT INT8 of none, Paddle INT8 of dynabert
        assert pipeline.needed_strategies(strategies, *pipeline.strategies_read(strategies, mixed, [])) == ["none", "dynabert", "dynabert_ptq"]

        # each variant is benchmarked once what it reads is compressed: the unpruned rows before DynaBERT's distillation
        def order(strategies, variants):
            reads, _ = pipeline.strategies_read(strategies, variants, [])
            return [(s, [f"{v.strategy}/{v.precision}" for v in ready])
                    for s, ready in pipeline.benchmark_order(strategies, reads)]

        assert order(strategies, variants) == [("none", ["none/fp32"]), ("ptq", ["none/int8"]),
                                               ("dynabert", ["dynabert/fp32"]), ("dynabert_ptq", ["dynabert/int8"])]
        assert order(["none", "dynabert"], ort) == [("none", ["none/fp32", "none/int8"]),
                                                    ("dynabert", ["dynabert/fp32", "dynabert/int8"])]
        assert order(["dynabert"], variants[2:3] + variants[:1]) == [("dynabert", ["dynabert/fp32"]), (None, ["none/fp32"])]


def test_task_overrides_reach_only_their_tasks_stages():
    from hydra import initialize_config_dir

    from ernie_lab import pipeline
    from tests.conftest import make_cfg

    user = ["experiment=converged"]
    cfg = make_cfg(user, config_name="pipeline")
    assert pipeline.task_overrides(cfg, "cmrc2018") == ["task.answerless_windows=0.3"]
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cmrc = pipeline._stage_config(user, ["task=cmrc2018", *pipeline.task_overrides(cfg, "cmrc2018")])
        tnews = pipeline._stage_config(user, ["task=tnews", *pipeline.task_overrides(cfg, "tnews")])
    assert cmrc.task.answerless_windows == 0.3 and "answerless_windows" not in tnews.task
    assert cmrc.train.max_steps is None and cmrc.train.learning_rate == 1.0e-4 and tnews.task.max_seq_length == 128


def test_a_second_phase_trains_on_its_own_overrides_and_the_later_stages_on_its_checkpoint():
    from hydra import initialize_config_dir

    from ernie_lab import artifacts, pipeline
    from tests.conftest import make_cfg

    user = ["experiment=converged"]
    cfg = make_cfg(user, config_name="pipeline")
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        tnews = pipeline._stage_config(user, ["task=tnews"])
        assert pipeline.training_phases(cfg, tnews) == ([], [])
        first = pipeline._stage_config(user, ["task=msra_ner"])
        later, second_phase = pipeline.training_phases(cfg, first)
        assert second_phase == [*later, *pipeline.continue_training(cfg, "msra_ner")]
        second = pipeline._stage_config(user, ["task=msra_ner", *second_phase])
        pruned = pipeline._stage_config(user, ["task=msra_ner", *later, "strategy=dynabert"])
        on_checkpoint = pipeline._stage_config(user, ["task=msra_ner", "model.init=checkpoint", "model.checkpoint_dir=/x"])
        with pytest.raises(ConfigError, match="continue_training.msra_ner.*model.init=checkpoint"):
            pipeline.training_phases(cfg, on_checkpoint)
    assert second.model.init == "checkpoint" and second.model.checkpoint_dir == str(artifacts.finetuned_dir(first))
    assert (second.train.epochs, second.train.learning_rate) == (2, 5.0e-5)
    assert (first.train.epochs, first.train.learning_rate) == (3, 1.5e-4)
    # the distillation reads the second phase's checkpoint, at the first phase's rate (the phase's overrides are its own)
    assert artifacts.finetuned_dir(pruned) == artifacts.finetuned_dir(second) != artifacts.finetuned_dir(first)
    assert pruned.prune.train.learning_rate == 1.5e-4
