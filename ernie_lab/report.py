"""`python -m ernie_lab.report`: the results table and Pareto charts of a sweep, read back from MLflow.

    python -m ernie_lab.report                               # the newest sweep (multirun or main job)
    python -m ernie_lab.report report.sweep_id=<parent run id>
    python -m ernie_lab.report report.filter="tags.task = 'tnews' and tags.model = 'ernie-3.0-medium'"

Writes `results.md` (the seed-shaped table) and `pareto_<task>.png` (metric against QPS) into the Hydra run
directory and logs them on the sweep's parent run. The tables and charts themselves are `ernie_lab.results`."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ernie_lab.cli import check_config, command_errors, prepare_cli
from ernie_lab.errors import MissingArtifactError
from ernie_lab.reporting import console
from ernie_lab.results import is_crash, results_from_runs, write_report
from ernie_lab.sweep import with_fp32_baselines
from ernie_lab.tracking import attach_run, find_runs


def select_runs(cfg: DictConfig) -> tuple[list, str | None]:
    """Finished infer runs of the chosen sweep (or filter), those whose engine crashed, and the sweep's parent run
    id."""
    rc = cfg.report
    if rc.filter:
        # MLflow filters are AND-only, without parentheses
        runs = find_runs(cfg.tracking, rc.filter if "tags.stage" in rc.filter else f"tags.stage = 'infer' and {rc.filter}")
        sweep = rc.sweep_id
    else:
        sweep = rc.sweep_id
        if sweep is None:
            sweeps = [r for r in find_runs(cfg.tracking, "tags.stage = 'sweep'") if r.info.status != "RUNNING"]
            if not sweeps:
                raise MissingArtifactError(f"no finished sweep in {cfg.tracking.tracking_uri}; run a multirun "
                                           "(`python infer.py -m ...`) or the main job first, or pass report.filter")
            sweep = max(sweeps, key=lambda r: r.info.start_time).info.run_id
        runs = find_runs(cfg.tracking, f"tags.sweep_id = '{sweep}' and tags.stage = 'infer'")
    # finished runs, and failed ones whose engine crashed (a row with the crash as its status)
    finished = [r for r in runs if r.info.status == "FINISHED" or (r.info.status == "FAILED" and is_crash(r.data.tags))]
    if not finished:
        where = f"sweep {sweep}" if not rc.filter else f"filter {rc.filter!r}"
        raise MissingArtifactError(f"no finished infer runs for {where} in {cfg.tracking.tracking_uri}")
    return finished, sweep


def make_report(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    runs, sweep = select_runs(cfg)
    results = with_fp32_baselines(results_from_runs(runs), cfg.tracking)
    parent = attach_run(cfg.tracking, sweep) if sweep else None
    out_dir = Path(cfg.report.output_dir or HydraConfig.get().runtime.output_dir)
    path = write_report(results, out_dir, parent)
    console.print(f"{len(results)} runs{f' of sweep {sweep}' if sweep else ''}; report written to {out_dir}"
                  f"{' and logged on the parent run' if parent else ''}")
    return path


@hydra.main(config_path="../conf", config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with command_errors():
        check_config(cfg)
        make_report(cfg)


def cli() -> None:
    prepare_cli(config_name="report")
    main()


if __name__ == "__main__":
    cli()
