"""python -m ernie_lab.step_benchmark: every variant and shape timed in its own process, the table logged on one
MLflow run; a bad shape is refused before any child starts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from omegaconf import OmegaConf

from ernie_lab.config import PROJECT_ROOT
from ernie_lab.tracking import find_runs
from tests.conftest import isolated_overrides

TINY = ["model=tiny", "step_benchmark.warmup_steps=0", "step_benchmark.timed_steps=1"]


def bench(tmp, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ernie_lab.step_benchmark", *TINY, *extra, *isolated_overrides(tmp)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})


def test_each_variant_and_shape_is_timed_and_logged(tmp_path):
    done = bench(tmp_path, "step_benchmark.shapes=[[2,16],[2,48]]")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tracking = OmegaConf.create({"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "ernie-lab"})
    [run] = find_runs(tracking, "tags.stage = 'step_benchmark'")
    metrics = run.data.metrics
    for variant in ("paddle_attention", "fused_attention", "fused_attention_kept_memory"):
        for shape in ("2x16", "2x48"):
            assert metrics[f"step/{variant}/{shape}/seconds"] > 0
            assert metrics[f"step/{variant}/{shape}/gflops"] > 0
    # FLOPs per step grow with the tokens, whatever the speed: GFLOP/s x seconds is the same per shape
    per_step = {shape: metrics[f"step/fused_attention/{shape}/gflops"] * metrics[f"step/fused_attention/{shape}/seconds"]
                for shape in ("2x16", "2x48")}
    assert per_step["2x48"] > 2.5 * per_step["2x16"]
    assert all(variant in done.stdout for variant in ("paddle_attention", "fused_attention_kept_memory"))  # the table


@pytest.mark.parametrize("override, message", [
    ("step_benchmark.shapes=[[2,16,3]]", "step_benchmark.shapes has [2, 16, 3]; each shape is two numbers, batch and tokens"),
    ("step_benchmark.baseline=fastest", "step_benchmark.baseline=fastest is not a variant; choose one of: paddle_attention, "),
    ("step_benchmark.variants={extra:[]}", "Could not override 'step_benchmark.variants'"),
])
def test_a_bad_setting_is_refused_in_one_line_before_any_step(tmp_path, override, message):
    done = bench(tmp_path, override)
    assert done.returncode == 2
    assert message in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr and "training steps" not in done.stdout
