"""Training speed: one eager training step (forward, backward, optimizer) of the configured model, timed per variant
and batch shape, as seconds, GFLOP/s and share of this CPU's fp32 GEMM peak.

    python -m ernie_lab.step_benchmark experiment=converged task=cmrc2018
    python -m ernie_lab.step_benchmark model=e5-small-zh 'step_benchmark.shapes=[[16,384]]'

Every (variant, shape) runs in a fresh child process: some settings are process-wide and cannot be undone
(`runtime.keep_freed_memory`), and a fresh process is what a training starts from. The table is printed, logged on
one MLflow run (metrics `step/<variant>/<batch>x<tokens>/...`, the table as `step_benchmark.md`), and the speed-ups
are against one variant of the same run (`step_benchmark.baseline`). Settings: `conf/step_benchmark.yaml`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from omegaconf import DictConfig

from ernie_lab.errors import ConfigError

CONFIG_NAME = "step_benchmark"


@dataclass(frozen=True)
class StepTiming:
    variant: str
    batch: int
    tokens: int
    seconds: float  # median of the timed steps
    gflop_per_step: float

    @property
    def gflops(self) -> float:
        return self.gflop_per_step / self.seconds

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.tokens}"


def shapes(cfg: DictConfig) -> list[tuple[int, int]]:
    out = []
    for shape in cfg.step_benchmark.shapes:
        if len(shape) != 2:
            raise ConfigError(f"step_benchmark.shapes has {list(shape)}; each shape is two numbers, batch and tokens, "
                              "e.g. [16, 384]")
        if int(shape[1]) > int(cfg.model.max_position_embeddings):
            raise ConfigError(f"step_benchmark.shapes has {list(shape)}: {shape[1]} tokens exceed "
                              f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
        out.append((int(shape[0]), int(shape[1])))
    return out


# ---- the child: one variant, one shape ------------------------------------------------------------------------
def time_steps(cfg: DictConfig, batch: int, tokens: int) -> dict:
    """Build the model as training does (fused attention, frozen word table per cfg.train), run the warm-up and
    timed steps on random token ids, return the median seconds and the FLOPs of one step."""
    import time

    import numpy as np

    from ernie_lab import runtime

    info = runtime.prepare(cfg.runtime, threads=int(cfg.train.threads))
    import paddle

    from ernie_lab.inference import roofline
    from ernie_lab.modeling import build_model, build_tokenizer
    from ernie_lab.tasks import build_task
    from ernie_lab.training import build_optimizer

    paddle.seed(int(cfg.seed))
    task = build_task(cfg.task, build_tokenizer(cfg.model))
    model = build_model(cfg.model, task.model_class(), task.head_config())
    if cfg.train.fused_attention:
        from ernie_lab import fused_attention

        fused_attention.enable(model)
    if cfg.train.freeze_word_embeddings:
        model.base_model.embeddings.word_embeddings.weight.stop_gradient = True
    optimizer, _ = build_optimizer(model, cfg.train, 1000)
    model.train()
    rng = np.random.default_rng(int(cfg.seed))
    ids = paddle.to_tensor(rng.integers(5, int(cfg.model.vocab_size), size=(batch, tokens)).astype("int64"))
    token_types = paddle.zeros([batch, tokens], dtype="int64")

    def step() -> float:
        started = time.perf_counter()
        outputs = model(ids, token_type_ids=token_types)
        outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
        loss = sum(out.astype("float32").mean() for out in outputs)  # every head's output reaches the backward
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        float(loss)
        return time.perf_counter() - started

    for _ in range(int(cfg.step_benchmark.warmup_steps)):
        step()
    seconds = sorted(step() for _ in range(int(cfg.step_benchmark.timed_steps)))
    flops = roofline.TRAIN_FLOPS_PER_FORWARD * roofline.pass_flops(roofline.model_shapes(cfg.model, {}, task),
                                                                   [(batch, tokens)])
    return {"seconds": seconds[len(seconds) // 2], "gflop_per_step": flops / 1e9,
            "keep_freed_memory": info.get("keep_freed_memory")}


def child_main(argv: list[str]) -> None:
    """`python -m ernie_lab.step_benchmark --child BATCH TOKENS OVERRIDES...`: one JSON line on stdout."""
    from ernie_lab.config import compose_config

    batch, tokens, overrides = int(argv[0]), int(argv[1]), argv[2:]
    cfg = compose_config(CONFIG_NAME, overrides)
    print("STEP_TIMING " + json.dumps(time_steps(cfg, batch, tokens)), flush=True)


# ---- the parent -------------------------------------------------------------------------------------------------
def run_child(overrides: list[str], batch: int, tokens: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "ernie_lab.step_benchmark", "--child", str(batch), str(tokens),
                           *overrides], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("STEP_TIMING ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"step benchmark child ({batch}x{tokens}, {' '.join(overrides)}) failed: " + " | ".join(tail))
    return json.loads(lines[-1].split(" ", 1)[1])


def measure(cfg: DictConfig, overrides: list[str]) -> list[StepTiming]:
    from ernie_lab.reporting import progress

    variants = {name: list(extra) for name, extra in cfg.step_benchmark.variants.items()}
    if not variants:
        raise ConfigError("step_benchmark.variants is empty; give at least one (a list of overrides, [] for none)")
    jobs = [(name, extra, batch, tokens) for name, extra in variants.items() for batch, tokens in shapes(cfg)]
    timings = []
    with progress() as bar:
        job = bar.add_task("training steps", total=len(jobs), info="")
        for name, extra, batch, tokens in jobs:
            bar.update(job, info=f"{name} {batch}x{tokens}")
            got = run_child([*overrides, *extra], batch, tokens)
            timings.append(StepTiming(name, batch, tokens, got["seconds"], got["gflop_per_step"]))
            bar.advance(job)
    return timings


def fp32_peak(cfg: DictConfig) -> float | None:
    """This CPU's fp32 GEMM peak at the training's threads (roofline probe, cached), None where none is known."""
    from omegaconf import OmegaConf

    from ernie_lab.inference import roofline

    enabled, cache_file, probe_seconds = roofline._settings(cfg)
    if not enabled or cfg.runtime.device != "cpu":
        return None
    runtime = {**OmegaConf.to_container(cfg.runtime, resolve=True), "threads": int(cfg.train.threads)}
    return roofline.peaks(runtime, cache_file, probe_seconds).get("fp32_gflops")


def baseline(cfg: DictConfig) -> str:
    """The variant the speed-ups are measured against: step_benchmark.baseline, or the first."""
    names = list(cfg.step_benchmark.variants)
    chosen = cfg.step_benchmark.baseline
    if chosen is None:
        return names[0] if names else ""
    if chosen not in names:
        raise ConfigError(f"step_benchmark.baseline={chosen} is not a variant; choose one of: {', '.join(names)}")
    return chosen


def rows(timings: list[StepTiming], peak: float | None, base_variant: str) -> list[list[str]]:
    """The table: variant, shape, seconds, GFLOP/s, % of peak, speed-up against the baseline variant's same shape."""
    base = {t.shape: t.seconds for t in timings if t.variant == base_variant}
    return [[t.variant, t.shape, f"{t.seconds:.3f}", f"{t.gflops:.1f}",
             f"{100 * t.gflops / peak:.0f}%" if peak else "-", f"{base[t.shape] / t.seconds:.2f}x"] for t in timings]


HEADER = ["variant", "batch x tokens", "seconds / step", "GFLOP/s", "% of fp32 peak", "speed-up"]


def main(argv: list[str]) -> None:
    from ernie_lab import runtime
    from ernie_lab.cli import check_config, command_errors, fail, prepare_cli
    from ernie_lab.config import compose_config
    from ernie_lab.reporting import console, markdown_table, table
    from ernie_lab.tracking import tracked_run

    from hydra.errors import HydraException

    prepare_cli(argv, config_name=CONFIG_NAME)
    try:
        cfg = compose_config(CONFIG_NAME, argv)
    except HydraException as exc:  # what Hydra's own command line would say, without its traceback
        fail(str(exc).splitlines()[0])
    with command_errors("step_benchmark"):
        check_config(cfg)
        baseline(cfg)
        shapes(cfg)  # a bad shape fails before the first child
        with tracked_run(cfg, "step_benchmark", run_name=f"step_benchmark-{cfg.model.name}-{cfg.task.name}") as run:
            timings = measure(cfg, argv)
            runtime.prepare(cfg.runtime, threads=int(cfg.train.threads))  # for the peak probe
            peak = fp32_peak(cfg)
            body = rows(timings, peak, baseline(cfg))
            for t, row in zip(timings, body):
                key = f"step/{t.variant}/{t.shape}"
                run.log_metrics({f"{key}/seconds": t.seconds, f"{key}/gflops": t.gflops,
                                 **({f"{key}/roofline_pct": 100 * t.gflops / peak} if peak else {})})
            flags = " ".join(name for name, present in runtime.cpu_flags().items() if present)
            title = (f"training step, {cfg.model.name} / {cfg.task.name}, {cfg.train.threads} threads; "
                     f"{runtime.cpu_model()} ({flags})" + (f"; fp32 GEMM peak {peak:.1f} GFLOP/s" if peak else ""))
            run.log_text(f"# {title}\n\n" + markdown_table(HEADER, body) + "\n", "step_benchmark.md")
            console.print(table(title, HEADER, body))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
