"""Post-training quantization that chooses its calibration: every (algorithm, calibration size) pair of
`quantize.search` is quantized, scored with the task metric on held-out examples that calibration never saw, and
compared with the float export scored the same way. The best candidate within the accuracy budget is exported.

Every model is scored in a fresh process (engine.run_isolated): several oneDNN INT8 predictors in one process
change each other's outputs."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from ernie_lab.compression.export import MODEL_FILE, PARAMS_FILE
from ernie_lab.compression.quantize import calibration_passes, check_algo, quantize_ptq
from ernie_lab.errors import ConfigError, check_choice
from ernie_lab.inference.batching import batches
from ernie_lab.inference.workload import EvalWorkload
from ernie_lab.reporting import console, fmt, progress, table

ON_BUDGET_MISS = ("fail", "keep_best")
CANDIDATES_DIR = "ptq_candidates"
# Drops are differences of 0-100 metrics; a drop equal to the budget must not miss it by rounding.
BUDGET_TOLERANCE = 1e-9

log = logging.getLogger(__name__)


class BudgetMissError(ConfigError):
    """No PTQ candidate kept the held-out metric within quantize.search.budget of the float export."""


@dataclass
class Candidate:
    name: str
    algo: str
    batch_nums: int
    samples: int  # calibration examples (the first `samples` of the held-out slice)
    index: int  # position in the grid: the last tie-breaker
    calibration_features: int = 0
    calibration_seconds: float = 0.0
    metric: float = float("nan")
    drop: float = float("nan")
    within_budget: bool = False
    scores: dict = field(default_factory=dict)

    def cost(self) -> tuple:
        """Cheaper calibration first: fewer samples, then one data pass before two."""
        return self.samples, calibration_passes(self.algo), self.index


# ---- config ------------------------------------------------------------------------------------------------
def none_as_null(value):
    return "null" if value is None else value


def budget_of(s: DictConfig) -> float:
    try:
        return float(s.budget)
    except (TypeError, ValueError):
        raise ConfigError(f"quantize.search.budget={s.budget!r} must be a number of metric points") from None


def grid(q: DictConfig) -> list[Candidate]:
    """The candidates of `quantize.search`, validated; duplicates are dropped."""
    s = q.search
    algos = list(dict.fromkeys(s.algos))
    sizes = list(dict.fromkeys(int(n) for n in s.batch_nums))
    if not algos or not sizes:
        raise ConfigError(f"quantize.search.algos={algos} and quantize.search.batch_nums={sizes}: "
                          f"both need at least one entry")
    for algo in algos:
        check_algo("quantize.search.algos entry", algo)
    bad = [n for n in sizes if n < 1]
    if bad:
        raise ConfigError(f"quantize.search.batch_nums={sizes}: every entry must be >= 1 (got {bad})")
    if int(s.eval_samples) < 1:
        raise ConfigError(f"quantize.search.eval_samples={s.eval_samples} must be >= 1")
    check_choice("quantize.search.on_budget_miss", s.on_budget_miss, ON_BUDGET_MISS)
    budget_of(s)  # a non-number fails here, before any work
    batch_size = int(q.batch_size)
    pairs = [(a, n) for n in sizes for a in algos]
    return [Candidate(f"{a}-{n}x{batch_size}", a, n, n * batch_size, i) for i, (a, n) in enumerate(pairs)]


def split_heldout(cfg: DictConfig, heldout: list[dict], candidates: Sequence[Candidate]) -> tuple[list, list]:
    """(calibration examples, scoring examples): calibration takes the head of the held-out slice, scoring its
    tail, so the scored examples do not depend on the grid and calibration never sees them."""
    need_cal = max(c.samples for c in candidates)
    need_eval = int(cfg.quantize.search.eval_samples)
    if len(heldout) < need_cal + need_eval:
        data = cfg.task.data
        raise ConfigError(
            f"quantize.search needs {need_cal} calibration examples (quantize.batch_size={cfg.quantize.batch_size} x "
            f"max(quantize.search.batch_nums)) plus {need_eval} evaluation examples (quantize.search.eval_samples) "
            f"from the held-out slice of train, which has {len(heldout)}: raise task.data.heldout_size "
            f"(now {data.heldout_size}) or task.data.limit.heldout (now {none_as_null(data.limit.get('heldout'))}), "
            f"or lower the search sizes"
        )
    return heldout[:need_cal], heldout[len(heldout) - need_eval :]


# ---- the steps -----------------------------------------------------------------------------------------------
def calibrate(task, examples: list[dict], float_dir: Path, out_dir: Path, qcfg: DictConfig,
              skip_tensors: Sequence[str] = ()) -> tuple[int, float]:
    """Quantize `float_dir` into `out_dir` on `examples`; returns (calibration features, seconds). At most
    quantize.batch_size*batch_nums features, as PaddleSlim counts its batches: a CMRC2018 example makes several
    192- to 512-token windows, and histogramming all of them took minutes (3.7 min for 64 questions)."""
    features = task.featurize(examples, training=False)[: int(qcfg.batch_size) * int(qcfg.batch_nums)]
    feeds = [task.collate(chunk) for chunk in batches(features, int(qcfg.batch_size))]
    start = time.perf_counter()
    with progress() as bar:
        job = bar.add_task(f"calibrate ({qcfg.algo})", total=len(feeds) * calibration_passes(qcfg.algo),
                           info=f"{len(examples)} held-out samples")
        quantize_ptq(float_dir, out_dir, feeds, qcfg, on_batch=lambda: bar.advance(job), skip_tensors=skip_tensors)
    return len(features), time.perf_counter() - start


class HeldoutScorer:
    """Scores exported models on fixed held-out examples exactly as infer scores the eval split (the same
    workload, in a process of its own)."""

    def __init__(self, task, examples: list[dict], runtime: dict, batch_size: int):
        self.task, self.examples, self.runtime = task, examples, runtime
        self.workload = EvalWorkload(task, examples, task.featurize(examples, training=False), batch_size)

    def __call__(self, model_dir: Path, precision: str) -> dict[str, float]:
        from ernie_lab.inference.engine import run_isolated

        done = run_isolated(model_dir, self.runtime, precision, self.workload, what="calibration scoring")["predictions"]
        return self.task.metrics(self.examples, done["predictions"])


def select(candidates: Sequence[Candidate], budget: float, on_budget_miss: str, primary: str,
           reference: float) -> Candidate:
    """The best held-out metric within budget (ties: the cheaper calibration). Marks `within_budget`."""
    check_choice("quantize.search.on_budget_miss", on_budget_miss, ON_BUDGET_MISS)
    for c in candidates:
        c.within_budget = c.drop <= budget + BUDGET_TOLERANCE
    within = [c for c in candidates if c.within_budget]
    if not within:
        listing = "; ".join(f"{c.name}: {primary} {c.metric:.2f} (drop {c.drop:+.2f})" for c in candidates)
        message = (f"no PTQ candidate is within quantize.search.budget={budget} points of the float export's "
                   f"held-out {primary} ({reference:.2f}). Candidates: {listing}")
        if on_budget_miss == "fail":
            raise BudgetMissError(f"{message}. Raise the budget, widen the grid, or set "
                                  f"quantize.search.on_budget_miss=keep_best to export the best one anyway")
        best = min(candidates, key=lambda c: (-c.metric, *c.cost()))
        console.print(f"[bold yellow]warning:[/] {message}. Keeping the best, {best.name}, "
                      f"as quantize.search.on_budget_miss=keep_best says")
        log.warning("%s; keeping %s (on_budget_miss=keep_best)", message, best.name)
        return best
    return min(within, key=lambda c: (-c.metric, *c.cost()))


# ---- the search ----------------------------------------------------------------------------------------------
def search(cfg: DictConfig, task, heldout: list[dict], float_dir: Path, out_dir: Path,
           skip_tensors: Sequence[str], run) -> dict:
    """Run the grid, export the chosen candidate's files into `out_dir`, log everything; returns the summary."""
    q, s = cfg.quantize, cfg.quantize.search
    candidates = grid(q)
    budget, primary = budget_of(s), task.primary_metric
    cal_examples, eval_examples = split_heldout(cfg, heldout, candidates)
    score = HeldoutScorer(task, eval_examples, OmegaConf.to_container(cfg.runtime, resolve=True),
                          int(cfg.benchmark.batch_size))
    console.print(f"[bold]ptq search[/] {len(candidates)} candidate(s), scored on the last {len(eval_examples)} "
                  f"held-out examples (calibration uses the first {len(cal_examples)}); "
                  f"budget {budget} {primary} points")

    reference_scores = score(float_dir, "fp32")
    reference = reference_scores[primary]
    root = out_dir / CANDIDATES_DIR
    for c in candidates:
        c.calibration_features, c.calibration_seconds = calibrate(
            task, cal_examples[: c.samples], float_dir, root / c.name,
            OmegaConf.merge(q, {"algo": c.algo, "batch_nums": c.batch_nums}), skip_tensors)
        c.scores = score(root / c.name, "int8")
        c.metric, c.drop = c.scores[primary], reference - c.scores[primary]

    chosen = None
    try:
        chosen = select(candidates, budget, s.on_budget_miss, primary, reference)
    finally:  # a budget miss is shown and logged too, so the failed run still holds every candidate
        summary = {
            **OmegaConf.to_container(s, resolve=True),
            "primary_metric": primary,
            "calibration_examples": len(cal_examples),
            "eval_examples": len(eval_examples),
            "eval_features": len(score.workload.features),
            "reference": {"model": "float", "precision": "fp32", "metric": reference, "scores": reference_scores},
            "candidates": [asdict(c) for c in candidates],
            "chosen": chosen.name if chosen else None,
            "chosen_within_budget": bool(chosen and chosen.within_budget),
        }
        console.print(search_table(summary, primary))
        log_search(run, summary, candidates)
    for name in (MODEL_FILE, PARAMS_FILE):
        shutil.copy2(root / chosen.name / name, out_dir / name)
    shutil.rmtree(root)
    run.log_metrics({"ptq/heldout_metric": chosen.metric, "ptq/heldout_drop": chosen.drop,
                     "ptq/float_heldout_metric": reference, "ptq/calibration_seconds": chosen.calibration_seconds})
    run.set_tags({"ptq_choice": chosen.name, "ptq_choice_within_budget": chosen.within_budget})
    console.print(f"chose [bold]{chosen.name}[/]: held-out {primary} {chosen.metric:.2f} "
                  f"(float {reference:.2f}, drop {chosen.drop:+.2f})")
    return summary


def log_search(run, summary: dict, candidates: Sequence[Candidate]) -> None:
    run.log_dict(summary, "ptq_search.json")
    for i, c in enumerate(candidates):  # one step per candidate, in grid order (the table's rows)
        run.log_metrics({"ptq_search/heldout_metric": c.metric, "ptq_search/heldout_drop": c.drop,
                         "ptq_search/calibration_seconds": c.calibration_seconds,
                         "ptq_search/calibration_samples": c.samples}, step=i)


def search_table(summary: dict, primary: str):
    ref = summary["reference"]
    rows = [("float", "-", "-", "-", "-", fmt(ref["metric"]), "-", "-", "reference")]
    for c in summary["candidates"]:
        rows.append((c["name"], c["algo"], c["batch_nums"], c["samples"], fmt(c["calibration_seconds"], 1),
                     fmt(c["metric"]), f"{c['drop']:+.2f}", "yes" if c["within_budget"] else "no",
                     "chosen" if c["name"] == summary["chosen"] else ""))
    return table(f"PTQ search · held-out {primary} · budget {summary['budget']}",
                 ["candidate", "algo", "batches", "samples", "calib s", primary, "drop", "in budget", ""], rows)
