"""MLflow bookkeeping: failed runs are FAILED with their traceback, a multirun shares one parent run and goes
on past a failed job, and the sweep exits non-zero naming the failed job."""
from __future__ import annotations

import pytest

from ernie_lab.tracking import find_runs, tracked_run
from tests.conftest import run_script


def test_a_run_that_raises_is_failed_with_its_traceback(cfg_factory, tmp_path):
    cfg = cfg_factory("model=tiny")
    with pytest.raises(ValueError, match="boom"):
        with tracked_run(cfg, "train") as run:
            run.log_metrics({"train/loss": 1.0})
            raise ValueError("boom")
    (failed,) = find_runs(cfg.tracking, "tags.stage = 'train'")
    assert failed.info.status == "FAILED"
    assert "ValueError: boom" in failed.data.tags["error"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.tracking_uri)
    text = open(client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path))).read()
    assert "Traceback" in text and "boom" in text
    assert failed.data.params["model.name"] == "tiny"  # the whole config is there to reproduce it


def test_multirun_records_the_failed_job_and_runs_the_others(tmp_path):
    # job #0 reads a data directory that does not exist (an invalid *value*, e.g. task.data.source=nowhere, is
    # refused before the sweep starts: tests/test_config.py); job #1 must still train
    from tests.conftest import DATA_DIR

    nowhere = tmp_path / "nowhere"
    result = run_script(
        "train.py", "-m", "model=tiny", f"task.data.dir={nowhere},{DATA_DIR / 'tnews'}", "task.data.limit.train=64",
        "task.data.limit.eval=32", "train.epochs=1", tmp=tmp_path, timeout=300,
    )
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "1 of 2 jobs failed" in out and f"task.data.dir={nowhere}" in out
    assert str(nowhere) in out
    # an error the project raises on purpose is one line in a multirun too, never a traceback
    assert "Traceback" not in out and f"error (train): " in out, out[-3000:]
    from omegaconf import OmegaConf

    tracking = OmegaConf.create({"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "ernie-lab"})
    jobs = {r.data.params["task.data.dir"]: r for r in find_runs(tracking, "tags.stage = 'train'")}
    (parent,) = find_runs(tracking, "tags.stage = 'sweep'")
    assert jobs[str(nowhere)].info.status == "FAILED" and "nowhere" in jobs[str(nowhere)].data.tags["error"]
    local = jobs[str(DATA_DIR / "tnews")]
    assert local.info.status == "FINISHED" and "best/accuracy" in local.data.metrics
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs.values()} == {parent.info.run_id}
    assert {r.data.tags["sweep_id"] for r in jobs.values()} == {parent.info.run_id}
    assert parent.info.status == "FAILED"


def test_a_sweep_lists_its_failed_jobs_on_the_parent_run(cfg_factory, tmp_path, capsys):
    """The parent run of a sweep with a failed job is FAILED and carries failed_jobs.txt naming that job (with
    its overrides and error) and no other."""
    import os

    from hydra.core.utils import JobReturn, JobStatus
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from ernie_lab.errors import ConfigError
    from ernie_lab.sweep import SweepCallback
    from ernie_lab.tracking import PARENT_RUN_ENV

    tracking = cfg_factory("model=tiny").tracking
    config = OmegaConf.create({
        "hydra": {"job": {"name": "train"}, "overrides": {"task": ["task.data.source=nowhere,local"]}},
        "tracking": OmegaConf.to_container(tracking, resolve=True),
        "model": {"name": "tiny"},
    })
    callback = SweepCallback()
    callback.on_multirun_start(config)
    for num, source, status, value in [(0, "nowhere", JobStatus.FAILED, ConfigError("no such source")),
                                       (1, "local", JobStatus.COMPLETED, None)]:
        job = OmegaConf.create({"hydra": {"job": {"num": num}}})
        returned = JobReturn(overrides=[f"task.data.source={source}"], status=status, _return_value=value)
        callback.on_job_end(job, returned)
    callback.on_multirun_end(config)

    assert PARENT_RUN_ENV not in os.environ  # later runs of this process are not children of the finished sweep
    (parent,) = find_runs(tracking, "tags.stage = 'sweep'")
    assert parent.info.status == "FAILED"
    path = MlflowClient(tracking.tracking_uri).download_artifacts(parent.info.run_id, "failed_jobs.txt", str(tmp_path))
    assert open(path).read().strip() == "#0 task.data.source=nowhere: no such source"
    assert "1 of 2 jobs failed" in capsys.readouterr().err


def _raise_through(*files: str) -> BaseException:
    """An exception whose traceback passes through functions 'defined' in `files`, outermost first."""
    namespace: dict = {}
    for depth, name in enumerate(files):
        callee = f"f{depth + 1}()" if depth + 1 < len(files) else "raise SystemExit(143)"
        exec(compile(f"def f{depth}():\n    {callee}\n", f"/x/ernie_lab/{name}", "exec"), namespace)
    try:
        namespace["f0"]()
    except SystemExit as exc:
        return exc
    raise AssertionError("nothing raised")


@pytest.mark.parametrize("helper", ["tracking.py", "tasks/heads.py", "metrics.py"])
def test_a_stop_inside_a_helper_names_the_stage_that_called_it(helper):
    from ernie_lab.tracking import stopped_at

    where = stopped_at(_raise_through("cli.py", "training.py", helper, "signals.py"))
    assert where == f"ernie_lab/training.py:2 in f1 > ernie_lab/{helper}:2 in f2"
    assert stopped_at(_raise_through("cli.py", "training.py", "signals.py")) == "ernie_lab/training.py:2 in f1"


def test_a_failed_single_run_leaves_the_sweep_callback_quiet():
    """Outside a multirun Hydra has no job number (`???`); the callback once read it for the failed-job line and
    Hydra printed a MissingMandatoryValue warning under the run's own error."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from ernie_lab.sweep import SweepCallback

    callback = SweepCallback()
    job = OmegaConf.create({"hydra": {"job": {"num": "???"}}})
    callback.on_job_end(job, JobReturn(overrides=["model=tiny"], status=JobStatus.FAILED, _return_value=ValueError("x")))
    assert callback.failed == [] and callback.done == 0
