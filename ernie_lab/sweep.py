"""The Hydra callback that groups a multirun under one MLflow parent run (conf/hydra/default.yaml), and closes
that run in a true state: FINISHED, FAILED with the failed jobs named, or KILLED when the sweep was stopped.
Part of the command layer: it ends benchmark sweeps with the results table."""
from __future__ import annotations

import atexit
import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ernie_lab import signals
from ernie_lab.results import missing_baselines, results_from_runs, write_report
from ernie_lab.tracking import (PARENT_RUN_ENV, SWEEP_ID_ENV, TrackedRun, attach_run, end_run, find_runs, start_parent_run,
                               ui_hint)

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a hard dependency
    Callback = object


class SweepCallback(Callback):
    """Groups a Hydra multirun under one MLflow parent run and names the failed jobs when it ends.

    The parent run (and the experiment) is created once, before any job starts, and its id reaches the jobs
    through ERNIE_LAB_PARENT_RUN_ID / ERNIE_LAB_SWEEP_ID. Launchers that run jobs in other processes (joblib's
    loky workers, SLURM jobs through submitit) call `on_job_start`/`on_job_end` on a pickled copy of this
    callback there: the copy sets those variables from its own state and reports each job's outcome as a
    `job.<num>` tag of the parent run, which `_finish` reads back.

    Hydra's basic sweeper runs every job, then re-raises the first failure and skips `on_multirun_end`,
    so closing the parent run also happens at exit."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.parent: TrackedRun | None = None
        self.parent_id: str | None = None
        self.tracking: dict | None = None
        self.origin: tuple[str, int] | None = None  # (host, pid) of the process that started the sweep
        self.failed: list[str] = []
        self.done = 0

    def __getstate__(self) -> dict:
        # What a job in another process needs: the MLflow client and the sweep config stay here.
        return {**self.__dict__, "parent": None, "config": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        job = config.hydra.job.name
        # unresolved: an override may hold an interpolation that only a job can resolve (`${hydra:job.num}`)
        overrides = " ".join(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        self.config = config
        self.parent = start_parent_run(config, f"sweep-{job}", {"sweep_command": f"{job} {overrides}"[:5000]})
        self.parent_id = self.parent.run_id
        self.tracking = OmegaConf.to_container(config.tracking, resolve=True)
        self.origin = (platform.node(), os.getpid())
        os.environ[PARENT_RUN_ENV] = self.parent.run_id
        os.environ[SWEEP_ID_ENV] = self.parent.run_id
        atexit.register(self._finish)

    def _remote(self) -> bool:
        return self.parent_id is not None and (platform.node(), os.getpid()) != self.origin

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self._remote():  # a worker process: its runs are children of this sweep whatever its environment
            os.environ[PARENT_RUN_ENV] = self.parent_id
            os.environ[SWEEP_ID_ENV] = self.parent_id

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if self.parent_id is None:  # a single run: no sweep to report to, and Hydra gives it no job number
            return
        line = None
        if job_return.status == JobStatus.FAILED:
            overrides = " ".join(job_return.overrides or [])
            line = f"#{config.hydra.job.num} {overrides}: {job_return._return_value}"
        if not self._remote():
            self.done += 1
            if line:
                self.failed.append(line)
            return
        status = f"FAILED {line}"[:5000] if line else "FINISHED"
        attach_run(OmegaConf.create(self.tracking), self.parent_id).set_tags({f"job.{config.hydra.job.num}": status})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish()

    def _collect_remote_jobs(self, parent: TrackedRun) -> None:
        """Outcomes reported by jobs that ran in other processes, and child runs that a dead process left open
        (a worker killed by the OOM killer or a scheduler): those are closed as KILLED and count as failed."""
        tags = parent.client.get_run(parent.run_id).data.tags
        reported = sorted((int(k[4:]), v) for k, v in tags.items() if k.startswith("job.") and k[4:].isdigit())
        self.done += len(reported)
        self.failed += [v[len("FAILED "):] for _, v in reported if v.startswith("FAILED ")]
        for run in find_runs(OmegaConf.create(self.tracking), f"tags.sweep_id = '{parent.run_id}'"):
            if run.info.run_id != parent.run_id and run.info.status == "RUNNING":
                parent.client.set_tag(run.info.run_id, "error", "the job's process ended without closing this run")
                parent.client.set_terminated(run.info.run_id, "KILLED")
                self.failed.append(f"run {run.info.run_name} ({run.info.run_id}): its process ended without closing it")

    def _finish(self) -> None:
        if self.parent is None:
            return
        parent, self.parent = self.parent, None
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEEP_ID_ENV, None)
        self._collect_remote_jobs(parent)
        if self.failed:
            parent.log_text("\n".join(self.failed), "failed_jobs.txt")
            from rich.console import Console

            console = Console(stderr=True)
            console.print(f"[bold red]{len(self.failed)} of {max(self.done, len(self.failed))} jobs failed:[/]")
            for line in self.failed:
                console.print(f"  [red]{line}[/]")
        stopped = signals.received()
        if stopped:
            parent.set_tags({"error": f"sweep stopped by {stopped}"})
        else:  # a stopped sweep gets no table: its jobs did not all run
            self._closing_table(parent)
        end_run(parent, failed=bool(self.failed), killed=bool(stopped))
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"MLflow parent run {parent.run_id} (sweep_id tag); to compare the "
                                                   f"runs, {ui_hint(OmegaConf.create(self.tracking))}", highlight=False)

    def _closing_table(self, parent: TrackedRun) -> None:
        """Benchmark sweeps end with the report of their finished jobs (seed-shaped table, Pareto charts), and of
        those whose engine crashed (a row with the crash as its status), written into the sweep directory and
        logged on the parent."""
        runs = find_runs(self.config.tracking, f"tags.sweep_id = '{parent.run_id}' and tags.stage = 'infer'")
        results = results_from_runs(runs)  # finished runs, and failed ones with a crash tag
        if results:
            results = with_fp32_baselines(results, self.config.tracking)
            write_report(results, Path(self.config.hydra.sweep.dir), parent)


def with_fp32_baselines(results: list[dict], tracking_cfg: DictConfig) -> list[dict]:
    """`results` plus, for each task without its Paddle FP32 row (a sweep of `precision=fp16,int8` after the main
    job), this machine's latest finished Paddle FP32 run of the same model, weights and eval examples, named in
    `borrowed_from`: every speedup and delta of the report is then against this machine's FP32."""
    extra = []
    for want in missing_baselines(results):
        runs = find_runs(tracking_cfg, f"tags.stage = 'infer' and tags.task = '{want['task']}' and "
                                       f"tags.model = '{want['model']}' and tags.precision = 'fp32' and "
                                       f"tags.runtime = 'cpu' and tags.host = '{platform.node()}' and "
                                       f"attributes.status = 'FINISHED'")
        same = [r for r in runs if r.data.tags.get("export_strategy", r.data.tags.get("strategy")) == "none"
                and r.data.tags.get("model_init", "") == (want["model_init"] or "")
                and r.data.params.get("data.eval_examples") == want["eval_examples"]]
        if not same:
            continue
        run = max(same, key=lambda r: r.info.start_time)
        (row,) = results_from_runs([run])
        sweep = run.data.tags.get("sweep_id")
        started = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        row["borrowed_from"] = (f"run {run.info.run_name} ({run.info.run_id}, {started}"
                                f"{f', sweep {sweep}' if sweep else ''})")
        extra.append(row)
    return extra + results  # the baselines first, as the first rows of the table
