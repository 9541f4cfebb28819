"""Data-parallel fine-tuning with Paddle's own launcher, two CPU processes (gloo): one model, one MLflow run."""
from __future__ import annotations

import os
import subprocess
import sys

from omegaconf import OmegaConf

from ernie_lab.config import PROJECT_ROOT
from ernie_lab.tracking import find_runs
from tests.conftest import SCRIPT_BASE, isolated_overrides


def test_two_processes_train_one_model_and_only_rank_0_records_it(tmp_path):
    cmd = [
        sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs"),
        str(PROJECT_ROOT / "train.py"), *SCRIPT_BASE, "model=tiny", "task.data.limit.train=256", "task.data.limit.eval=64",
        "task.data.heldout_size=64", "train.epochs=2", "train.batch_size=32",
        "train.learning_rate=3e-3", "train.threads=1", *isolated_overrides(tmp_path),
    ]
    env = {**os.environ, "ERNIE_LAB_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "logs").glob("workerlog.*")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    assert (tmp_path / "logs" / "workerlog.1").is_file()  # two processes did run

    tracking = OmegaConf.create({"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "ernie-lab"})
    (run,) = find_runs(tracking, "tags.stage = 'train'")  # rank 1 logged nothing
    assert run.info.status == "FINISHED"
    assert run.data.params["train.processes"] == "2"
    assert run.data.metrics["train/steps"] == 16  # 2 epochs of 8 global batches of 32: the single-process schedule
    assert run.data.metrics["train/loss_last"] < run.data.metrics["train/loss_first"]
    assert (tmp_path / "artifacts" / "tiny" / "random" / "tnews" / "finetuned" / "model_state.pdparams").is_file()
