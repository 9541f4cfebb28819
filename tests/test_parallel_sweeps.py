"""Parallel and cluster sweeps: a multirun through Hydra's joblib launcher (jobs in separate worker processes,
all writing to one sqlite MLflow store) records every job under one parent run, and a failed job still fails
the sweep; the SLURM launcher config composes without submitting anything."""
from __future__ import annotations

import subprocess
import sys

from omegaconf import OmegaConf

from ernie_lab.config import PROJECT_ROOT
from ernie_lab.tracking import find_runs
from tests.conftest import DATA_DIR, SCRIPT_BASE, isolated_overrides, make_cfg, run_script

PARALLEL = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
# a few steps of the tiny model on a few examples, one math thread per job (2 jobs share the cores)
TINY_TRAIN = ["model=tiny", "task=tnews", "task.data.limit.train=32", "task.data.limit.heldout=16",
              "task.data.limit.eval=16", "train.batch_size=8", "train.max_steps=2", "train.threads=1"]


def _tracking(tmp):
    return OmegaConf.create({"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment_name": "ernie-lab"})


def _runs(tmp):
    tracking = _tracking(tmp)
    (parent,) = find_runs(tracking, "tags.stage = 'sweep'")
    return parent, find_runs(tracking, "tags.stage = 'train'")


def test_a_parallel_sweep_records_every_job_under_one_parent(tmp_path):
    # Each job gets its own artifacts directory (`${hydra:job.num}`, resolved in the job), so that two trainings
    # of the same model and task do not share `finetuned/` and `train_state/`: the setting docs/scaling-out.md recommends.
    overrides = [o for o in isolated_overrides(tmp_path) if not o.startswith("paths.artifacts_dir=")]
    cmd = [sys.executable, str(PROJECT_ROOT / "train.py"), *PARALLEL[:1], *SCRIPT_BASE, *PARALLEL[1:], *TINY_TRAIN, "train.learning_rate=1e-3,2e-3",
           f"paths.artifacts_dir={tmp_path}/artifacts/job${{hydra:job.num}}", *overrides]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "Joblib.Parallel(n_jobs=2" in out  # really the joblib launcher

    parent, jobs = _runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep_id"] == parent.info.run_id
    assert "${hydra:job.num}" in parent.data.tags["sweep_command"]  # overrides kept as typed, not resolved
    # each worker reported its job on the parent run
    assert {k: v for k, v in parent.data.tags.items() if k.startswith("job.")} == {"job.0": "FINISHED", "job.1": "FINISHED"}
    assert sorted(float(r.data.params["train.learning_rate"]) for r in jobs) == [1e-3, 2e-3]
    for run in jobs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["sweep_id"] == parent.info.run_id
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"train/loss", "best/accuracy"} <= set(run.data.metrics)
        assert run.data.params["model.name"] == "tiny"
    assert {r.data.params["paths.artifacts_dir"] for r in jobs} == {f"{tmp_path}/artifacts/job0", f"{tmp_path}/artifacts/job1"}
    for num in (0, 1):
        assert (tmp_path / f"artifacts/job{num}/tiny/random/tnews/finetuned").is_dir()


def test_a_parallel_sweep_with_a_failed_job_fails_and_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_script("train.py", *PARALLEL, *TINY_TRAIN, f"task.data.dir={DATA_DIR / 'tnews'},{missing}",
                        tmp=tmp_path, timeout=400)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "1 of 2 jobs failed" in out and str(missing) in out

    parent, jobs = _runs(tmp_path)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["job.0"] == "FINISHED" and parent.data.tags["job.1"].startswith("FAILED #1 ")
    by_dir = {r.data.params["task.data.dir"]: r for r in jobs}
    assert by_dir[str(missing)].info.status == "FAILED" and str(missing) in by_dir[str(missing)].data.tags["error"]
    good = by_dir[str(DATA_DIR / "tnews")]
    assert good.info.status == "FINISHED" and "best/accuracy" in good.data.metrics
    assert {r.data.tags["sweep_id"] for r in jobs} == {parent.info.run_id}
    from mlflow.tracking import MlflowClient

    path = MlflowClient(_tracking(tmp_path).tracking_uri).download_artifacts(parent.info.run_id, "failed_jobs.txt", str(tmp_path))
    (line,) = open(path).read().strip().splitlines()
    assert line.startswith("#1 ") and str(missing) in line


def test_the_slurm_launcher_config_composes_without_submitting(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ernie_lab.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "model=tiny", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu"
    assert launcher.timeout_min > 0 and launcher.cpus_per_task >= 1
    assert launcher.submitit_folder.endswith(".submitit/%j")
    # the launcher object can be built from it (nothing is submitted before `launch`)
    from hydra.utils import instantiate

    assert type(instantiate(launcher)).__name__ == "SlurmLauncher"
    GlobalHydra.instance().clear()
    assert make_cfg(["model=tiny"]).model.name == "tiny"  # the default launcher is unaffected


def test_a_child_run_left_running_by_a_dead_worker_is_closed_as_killed(cfg_factory):
    """A worker killed mid-job (OOM killer, scheduler) never closes its run: the sweep's end does, and fails."""
    from ernie_lab.sweep import SweepCallback
    from ernie_lab.tracking import _client, experiment_id

    tracking = cfg_factory("model=tiny").tracking
    config = OmegaConf.create({"hydra": {"job": {"name": "train"}, "overrides": {"task": ["train.learning_rate=1,2"]}},
                               "tracking": OmegaConf.to_container(tracking, resolve=True), "model": {"name": "tiny"}})
    callback = SweepCallback()
    callback.on_multirun_start(config)
    client = _client(tracking)
    client.create_run(experiment_id(tracking), tags={"sweep_id": callback.parent_id, "stage": "train"})
    callback.on_multirun_end(config)
    (orphan,) = find_runs(tracking, "tags.stage = 'train'")
    (parent,) = find_runs(tracking, "tags.stage = 'sweep'")
    assert orphan.info.status == "KILLED" and "without closing" in orphan.data.tags["error"]
    assert parent.info.status == "FAILED"
