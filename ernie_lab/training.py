"""Fine-tuning in dygraph: train on `train`, select on the task's selection split, keep the best checkpoint.

Every `train.save_every_steps` steps and at each epoch end, `<task dir>/train_state/` is replaced atomically by
what resuming needs (weights, optimizer and LR schedule, the numpy RNG that orders each epoch, the position in
the epoch's order, losses, selection history, best so far, and the settings that made them; paddle's RNG, for
dropout, is re-seeded from (seed, step) at every step instead, as paddle 2.6 cannot save its position).
`train.resume=auto` continues from it when those settings match (otherwise it says so and starts over), `true`
insists on it, `false` starts over. A finished training removes it.

Started by `python -m paddle.distributed.launch --nproc_per_node N train.py ...`, N processes train one model
data-parallel (gloo on CPU, NCCL on GPUs): every process draws the same global batch order and takes its 1/N
share of each batch, gradients are averaged across processes, and only rank 0 evaluates, saves and logs, so
steps, schedule, checkpoints and resume state are those of a single-process run with the same batch size."""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ernie_lab import artifacts
from ernie_lab.config import flatten
from ernie_lab.errors import ConfigError, DataError, MissingArtifactError
from ernie_lab.inference.batching import batches, unbatch
from ernie_lab.modeling import build_model, build_tokenizer, count_parameters
from ernie_lab.reporting import console, fmt, progress, table
from ernie_lab.runtime import claim_threads, data_parallel_rank
from ernie_lab.tasks import build_task
from ernie_lab.tracking import TrackedRun

STATE_FILE = "state.json"


def to_tensors(batch: dict[str, np.ndarray]) -> dict:
    import paddle

    return {k: paddle.to_tensor(v) for k, v in batch.items()}


def as_tuple(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def predict_dygraph(model, task, features: list[dict], batch_size: int,
                    done: Callable[[int], None] | None = None) -> list[tuple[np.ndarray, ...]]:
    """Per-feature outputs of a dygraph model (used for selection during training and for export checks).
    `done(n)`: called after each batch with its number of features (a progress bar)."""
    import paddle

    model.eval()
    out = []
    with paddle.no_grad():
        for chunk in batches(features, batch_size):
            inputs = to_tensors(task.collate(chunk))
            arrays = [t.numpy() for t in as_tuple(model(inputs["input_ids"], token_type_ids=inputs["token_type_ids"]))]
            out.extend(unbatch(chunk, arrays, task.per_token_outputs))
            if done is not None:
                done(len(chunk))
    return out


def finetune(cfg: DictConfig, run: TrackedRun) -> dict:
    import paddle

    # Fresh parameter and optimizer-state names in every run (not counters shared by a whole process), so a
    # saved optimizer state finds its parameters again in a new process or in a later job of a sweep.
    with paddle.utils.unique_name.guard():
        return FineTuning(cfg, run).run()


# ---- pieces shared by fine-tuning and distillation (compression.dynabert) -----------------------------------

def count_steps(n_features: int, settings: DictConfig) -> tuple[int, int]:
    """(steps per epoch, total steps) for `settings` (batch_size, epochs, max_steps)."""
    steps_per_epoch = math.ceil(n_features / int(settings.batch_size))
    total = steps_per_epoch * int(settings.epochs)
    if settings.max_steps is not None:
        total = min(total, int(settings.max_steps))
    return steps_per_epoch, total


def build_optimizer(model, settings: DictConfig, total_steps: int):
    """AdamW over the trainable parameters, with linear warm-up and decay, no weight decay on biases and norms,
    and global-norm clipping: (optimizer, LR scheduler), from `settings` (learning_rate, warmup_proportion,
    weight_decay, max_grad_norm)."""
    import paddle
    from paddlenlp.transformers import LinearDecayWithWarmup

    scheduler = LinearDecayWithWarmup(float(settings.learning_rate), total_steps, float(settings.warmup_proportion))
    no_decay = {p.name for n, p in model.named_parameters() if "bias" in n or "norm" in n}
    optimizer = paddle.optimizer.AdamW(
        learning_rate=scheduler,
        parameters=[p for p in model.parameters() if not p.stop_gradient],
        weight_decay=float(settings.weight_decay),
        apply_decay_param_fun=lambda name: name not in no_decay,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(float(settings.max_grad_norm)) if settings.max_grad_norm else None,
    )
    return optimizer, scheduler


def length_grouped_order(rng: np.random.Generator, lengths: np.ndarray, batch_size: int,
                         pool_batches: int = 50) -> np.ndarray:
    """A shuffled order whose consecutive `batch_size` slices hold examples of similar length (less padding per
    batch: ~2x fewer token positions on MSRA_NER at batch 16). The examples are shuffled, sorted by length
    within pools of `pool_batches` batches, cut into batches, and the full batches shuffled; a short last batch
    stays last, so that every slice starts at a multiple of `batch_size`."""
    order = rng.permutation(len(lengths))
    pool = batch_size * pool_batches
    sorted_order = np.concatenate([
        part[np.argsort(-lengths[part], kind="stable")]
        for part in (order[start : start + pool] for start in range(0, len(order), pool))
    ]) if len(order) else order
    n_full = len(order) // batch_size
    full = sorted_order[: n_full * batch_size].reshape(n_full, batch_size)
    return np.concatenate([full[rng.permutation(n_full)].reshape(-1), sorted_order[n_full * batch_size :]])


def epoch_order(rng: np.random.Generator, features: list[dict], batch_size: int, group_by_length: bool) -> np.ndarray:
    """One epoch's order of `features`: length-grouped batches, or a plain shuffle."""
    if group_by_length:
        lengths = np.array([len(f["input_ids"]) for f in features])
        return length_grouped_order(rng, lengths, batch_size)
    return rng.permutation(len(features))


def loss_ends(losses: list[float]) -> tuple[float, float]:
    """Mean loss over the first and over the last few steps (a fifth of them, 1 to 20)."""
    window = max(1, min(20, len(losses) // 5))
    return float(np.mean(losses[:window])), float(np.mean(losses[-window:]))


# ---- fine-tuning -------------------------------------------------------------------------------------------

class FineTuning:
    """One fine-tuning run, in the order a reader looks for the parts: `prepare` (data, model, optimizer),
    `resume` (a saved state, if any), `train` (the loop, with selection and saved states), `summarize`."""

    def __init__(self, cfg: DictConfig, run: TrackedRun):
        self.cfg, self.run_log, self.tc = cfg, run, cfg.train
        self.state_dir = artifacts.train_state_dir(cfg)
        self.out_dir = artifacts.finetuned_dir(cfg)
        self.settings = resume_settings(cfg)
        # progress: what a saved state holds
        self.step, self.start_epoch, self.first_batch = 0, 0, 0
        self.best: dict = {"metric": -math.inf}
        self.history: list[dict] = []
        self.losses: list[float] = []
        # this process's steps, for train/gflops: their (rows, padded length) and the seconds spent in them
        self.step_shapes: list[tuple[int, int]] = []
        self.step_seconds = 0.0
        # wall-clock seconds of the earlier attempts a resumed training continues, and when this one started
        self.seconds_before, self.started = 0.0, time.perf_counter()

    def run(self) -> dict:
        check_train_settings(self.cfg)
        saved = find_train_state(self.state_dir, self.tc.resume, self.settings)  # a wrong resume fails before any work
        self.prepare()
        if saved is not None:
            self.resume(saved)
        first_step, started = self.step, time.perf_counter()
        self.train()
        if not self.lead:
            return {"checkpoint": str(self.out_dir), "rank": self.rank}  # rank 0 reports
        self.keep_better_start()
        # the checkpoint says it is complete before the state that could resume it goes (ernie_lab.stages reads it)
        mark_finished(self.out_dir, self.settings, self.step, self.history)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return self.summarize(time.perf_counter() - started, first_step)

    def prepare(self) -> None:
        import paddle

        cfg, tc = self.cfg, self.tc
        if cfg.runtime.device == "cpu":
            claim_threads(int(tc.threads))
        paddle.seed(int(cfg.seed))
        self.rng = np.random.default_rng(int(cfg.seed))
        self.tokenizer = build_tokenizer(cfg.model)
        self.task = task = build_task(cfg.task, self.tokenizer)

        train_examples = task.load("train")
        self.select_examples = task.load(cfg.task.selection_split)
        read_stats = {f"data.{k}": v for k, v in task.read_counts.items()}
        self.train_features = task.featurize(train_examples, training=True)
        train_stats = {f"data.train_{k}": v for k, v in task.data_stats().items()}
        self.select_features = task.featurize(self.select_examples, training=False)
        if not self.train_features:
            raise DataError(f"no training examples left in {cfg.task.data.dir} (after the data policies; see the warnings)")

        self.model = model = build_model(cfg.model, task.model_class(), task.head_config())
        self.n_params = count_parameters(model)
        if tc.fused_attention:
            from ernie_lab import fused_attention

            fused_attention.enable(model)
        self.rank, self.world = data_parallel_rank()
        self.lead = self.rank == 0  # the process that evaluates, saves and logs
        self.trained = model
        if self.world > 1:
            paddle.distributed.init_parallel_env()
            self.trained = paddle.DataParallel(model)  # averages gradients across the processes
        self.batch_size = int(tc.batch_size)
        self.steps_per_epoch, self.total_steps = count_steps(len(self.train_features), tc)
        if tc.freeze_word_embeddings:  # a pretrained table; updating its 40k rows densely costs ~25% of a small model's step
            model.base_model.embeddings.word_embeddings.weight.stop_gradient = True
        self.optimizer, self.scheduler = build_optimizer(model, tc, self.total_steps)
        self.run_log.log_params({
            "data.train_examples": len(train_examples),
            "data.train_features": len(self.train_features),
            "data.selection_examples": len(self.select_examples),
            "model.parameters": self.n_params,
            "train.total_steps": self.total_steps,
            "train.processes": self.world,
            **train_stats,
            **read_stats,
        })
        console.print(
            f"[bold]fine-tune[/] {cfg.task.name} on {cfg.model.name} ({cfg.model.init} init, {self.n_params / 1e6:.1f}M "
            f"params): {len(self.train_features)} train features, {self.total_steps} steps; selection on "
            f"{cfg.task.selection_split} ({len(self.select_examples)} examples)"
        )

    def resume(self, saved: dict) -> None:
        """Continue from a saved state (every process resumes from the same one)."""
        import paddle

        self.model.set_state_dict(paddle.load(str(self.state_dir / "model.pdparams")))
        self.optimizer.set_state_dict(paddle.load(str(self.state_dir / "optimizer.pdopt")))  # holds the scheduler's too
        self.rng.bit_generator.state = saved["epoch_rng"]  # redraws the interrupted epoch's order
        self.step, self.start_epoch, self.first_batch = saved["step"], saved["epoch"], saved["batch"]
        self.best, self.history, self.losses = saved["best"], saved["history"], saved["losses"]
        self.seconds_before = float(saved.get("seconds", 0.0))
        self.run_log.set_tags({"resumed_from_step": self.step})
        console.print(f"[bold]resume[/] from step {self.step} (epoch {self.start_epoch + 1}, batch {self.first_batch}) "
                      f"in {self.state_dir}")

    def train(self) -> None:
        tc = self.tc
        save_every = int(tc.save_every_steps) if tc.save_every_steps else 0
        with progress() as bar:
            job = bar.add_task("train", total=self.total_steps, completed=self.step, info="")
            for epoch in range(self.start_epoch, int(tc.epochs)):
                self.model.train()
                epoch_rng = self.rng.bit_generator.state
                order = self.epoch_order()
                for batch_index in range(self.first_batch if epoch == self.start_epoch else 0, self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    recent = self.train_step(order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size])
                    if recent is not None:
                        bar.update(job, info=f"loss {recent:.4f}")
                    bar.advance(job)
                    if tc.eval_every_steps and self.step % int(tc.eval_every_steps) == 0:
                        self.evaluate(epoch, bar)
                    if (save_every and self.step % save_every == 0 and self.step < self.total_steps
                            and batch_index + 1 < self.steps_per_epoch):
                        self.save_state(epoch, batch_index + 1, epoch_rng)  # (the epoch's last step is saved at its end)
                self.evaluate(epoch, bar)
                if self.step >= self.total_steps:
                    break
                self.save_state(epoch + 1, 0, self.rng.bit_generator.state)

    def epoch_order(self) -> np.ndarray:
        """The order of the train features in the next epoch, drawn from `self.rng` (so a resumed run redraws it)."""
        return epoch_order(self.rng, self.train_features, self.batch_size, bool(self.tc.group_by_length))

    def train_step(self, indices) -> float | None:
        """One optimizer step on the global batch `indices`; the recent mean loss when it is logged, else None."""
        import paddle

        started = time.perf_counter()
        chunk = [self.train_features[i] for i in indices]
        # this process's share of the global batch (a share left empty by a short last batch repeats its first
        # example: every process must take part in the gradient exchange)
        chunk = chunk[self.rank::self.world] or chunk[:1]
        batch = to_tensors(self.task.collate(chunk, with_labels=True))
        # Dropout draws from a stream seeded per step: paddle 2.6 cannot save its CPU generator's position
        # (a pickled get_rng_state() holds only the seed), so this is what makes a resumed run exact.
        paddle.seed(step_seed(int(self.cfg.seed), self.step))
        outputs = self.trained(batch["input_ids"], token_type_ids=batch["token_type_ids"])
        loss = self.task.loss(outputs, batch)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.clear_grad()
        self.step += 1
        self.losses.append(float(loss))
        self.step_seconds += time.perf_counter() - started
        self.step_shapes.append(tuple(int(x) for x in batch["input_ids"].shape))
        every = int(self.tc.log_every_steps)
        if self.step % every == 0 or self.step == self.total_steps:
            recent = float(np.mean(self.losses[-every:]))
            self.run_log.log_metrics({"train/loss": recent, "train/lr": self.scheduler.get_lr()}, step=self.step)
            return recent
        return None

    def evaluate(self, epoch: int, bar) -> None:
        """Score the selection split; keep the checkpoint when it is the best so far. `bar`: the training's
        progress display, which shows the scoring too (CMRC2018's 7,672 dev windows take ~29 minutes on 2 cores)."""
        if not self.lead:
            return
        task = self.task
        scoring = bar.add_task(f"select step {self.step}", total=len(self.select_features), info="features")
        outputs = predict_dygraph(self.model, task, self.select_features, int(self.cfg.benchmark.batch_size),
                                  lambda n: bar.advance(scoring, n))
        bar.remove_task(scoring)
        predictions = task.postprocess(self.select_examples, self.select_features, outputs)
        scores = task.metrics(self.select_examples, predictions)
        self.run_log.log_metrics({f"select/{k}": v for k, v in scores.items()}, step=self.step)
        self.history.append({"epoch": epoch, "step": self.step, **scores})
        improved = scores[task.primary_metric] > self.best["metric"]
        if improved:
            self.best.update(metric=scores[task.primary_metric], step=self.step, epoch=epoch, scores=scores)
            save_checkpoint(self.out_dir, self.model, self.tokenizer, self.cfg, self.best, self.n_params)
        # the selection curve, as it is drawn (a long run's log shows it without MLflow)
        console.print(f"select step {self.step} (epoch {epoch + 1}): "
                      + ", ".join(f"{k} {fmt(v)}" for k, v in scores.items())
                      + (" - best so far, checkpoint saved" if improved else f" - best stays {fmt(self.best['metric'])}"
                         f" (step {self.best['step']})"))
        self.model.train()

    def keep_better_start(self) -> None:
        """A training that continues a fine-tuned checkpoint (model.init=checkpoint) publishes that checkpoint
        when none of its own evaluations beat it: its best starts unset, so a second phase that only lost ground
        would otherwise replace a better model with a worse one. The start's score counts only when it was
        selected with the same task settings (split, data, lengths), the only scores comparable with this run's."""
        if self.cfg.model.init != "checkpoint":
            return
        start = Path(self.cfg.model.checkpoint_dir)
        state = artifacts.read_json(start / "training_state.json")
        start_best = state.get("best") or {}
        if start_best.get("metric") is None or state.get("task") != self.cfg.task.name:
            return  # not a checkpoint this project fine-tuned for this task: nothing to compare with
        if state.get("config") != OmegaConf.to_container(self.cfg.task, resolve=True):
            console.print(f"[yellow]not compared[/] with the starting checkpoint {start}: it was selected with other "
                          "task settings, so its score and this run's are not on the same scale")
            return
        if start_best["metric"] <= self.best["metric"]:
            return
        self.best = {**start_best, "kept_from": str(start)}
        with artifacts.atomic_dir(self.out_dir) as tmp:
            for path in start.iterdir():
                if path.is_file() and path.name != "training_state.json":
                    shutil.copy2(path, tmp / path.name)
            write_checkpoint_record(tmp, self.cfg, self.best, self.n_params)
        console.print(f"[bold]kept the starting checkpoint[/]: its {self.task.primary_metric} {fmt(start_best['metric'])}"
                      f" (step {start_best.get('step')} of the training that made it) beats this run's best; "
                      f"copied from {start} to {self.out_dir}")

    def save_state(self, epoch: int, batch: int, epoch_rng: dict) -> None:
        """Everything resuming needs, with `epoch_rng` the numpy RNG state that draws `epoch`'s order."""
        if not self.lead:
            return
        save_train_state(self.state_dir, self.model, self.optimizer, {
            "settings": self.settings, "step": self.step, "epoch": epoch, "batch": batch, "epoch_rng": epoch_rng,
            "best": self.best, "history": self.history, "losses": self.losses, "saved_at": artifacts.now_iso(),
            "seconds": self.seconds_before + time.perf_counter() - self.started,
        })

    def summarize(self, elapsed: float, first_step: int) -> dict:
        """Log and print the run's summary and selection history; the result train.py returns."""
        from ernie_lab.inference import roofline

        first, last = loss_ends(self.losses)
        best, name = self.best, self.cfg.task.name
        speed, speed_params = roofline.for_training(self.cfg, self.task, self.step_shapes, self.step_seconds)
        self.run_log.log_params(speed_params)
        self.run_log.log_metrics({
            **speed,
            "train/loss_first": first,
            "train/loss_last": last,
            "train/seconds": elapsed,
            "train/steps": self.step,
            "train/samples_per_second": (self.step - first_step) * self.batch_size / elapsed,
            **{f"best/{k}": v for k, v in best["scores"].items()},
        })
        self.run_log.log_dict({"history": self.history, "best": best}, "selection_history.json")
        console.print(table(
            f"fine-tuned {name} / {self.cfg.model.name}",
            ["epoch", "step", *best["scores"].keys()],
            [[h["epoch"], h["step"], *(fmt(h[k]) for k in best["scores"])] for h in self.history],
        ))
        where = (f"the starting checkpoint's (its step {best['step']}), kept" if best.get("kept_from")
                 else f"at step {best['step']}")
        console.print(f"best {self.task.primary_metric} {best['metric']:.2f} {where}; checkpoint: {self.out_dir}")
        if speed:
            pct = f", {speed['train/roofline_pct']:.0f}% of the fp32 GEMM peak" if "train/roofline_pct" in speed else ""
            console.print(f"training steps ran at {speed['train/gflops']:.1f} GFLOP/s{pct}")
        return {"checkpoint": str(self.out_dir), "loss_first": first, "loss_last": last,
                "seconds_all_attempts": self.seconds_before + time.perf_counter() - self.started, **best,
                "history": self.history}


def step_seed(seed: int, step: int) -> int:
    """A well-mixed seed for one training step (nearby seeds and steps give unrelated streams)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def check_train_settings(cfg: DictConfig) -> None:
    tc = cfg.train
    if not (isinstance(tc.resume, bool) or tc.resume == "auto"):
        raise ConfigError(f"train.resume={tc.resume!r} is not valid; choose one of: auto, true, false")
    if tc.save_every_steps is not None and int(tc.save_every_steps) < 1:
        raise ConfigError(f"train.save_every_steps={tc.save_every_steps} must be at least 1 (null: at epoch ends only)")
    if int(cfg.task.max_seq_length) > int(cfg.model.max_position_embeddings):
        raise ConfigError(
            f"task.max_seq_length={cfg.task.max_seq_length} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings} of model={cfg.model.name}; lower task.max_seq_length"
        )


# ---- resumable training state ------------------------------------------------------------------------------

# Settings that do not change what training computes; a saved state may be resumed whatever their values.
NOT_IN_FINGERPRINT = ("resume", "save_every_steps", "log_every_steps", "threads", "fused_attention")


def resume_settings(cfg: DictConfig) -> dict:
    """The settings a saved state must match to be resumed (seed, task, model, train), flattened."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    train = {k: v for k, v in resolved["train"].items() if k not in NOT_IN_FINGERPRINT}
    return flatten({"seed": resolved["seed"], "task": resolved["task"], "model": resolved["model"], "train": train})


def find_train_state(state_dir: Path, resume, settings: dict, option: str = "train.resume") -> dict | None:
    """The saved state to resume from, or None to start over (`resume`: auto, true or false; `option` names the
    key it came from, for the messages: train.resume, or prune.train.resume for DynaBERT's distillation)."""
    path = state_dir / STATE_FILE
    if resume is False:
        return None
    if not path.is_file():
        if resume is True:
            raise MissingArtifactError(
                f"{option}=true but {state_dir} holds no training state to resume; "
                f"use {option}=auto (or false) to start from the beginning"
            )
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    old = saved.get("settings", {})
    differ = sorted(k for k in old.keys() | settings.keys() if old.get(k) != settings.get(k))
    if not differ:
        return saved
    shown = "; ".join(f"{k} saved {old.get(k)!r}, now {settings.get(k)!r}" for k in differ[:5])
    if resume is True:
        raise ConfigError(
            f"{state_dir} was saved with other settings ({shown}); resume with the saved settings, "
            f"or start over with {option}=auto (or false)"
        )
    console.print(f"[yellow]not resuming[/] {state_dir}: saved with other settings ({shown}); starting over")
    return None


def save_train_state(state_dir: Path, model, optimizer, progress_state: dict) -> None:
    """Weights, optimizer (with its LR scheduler) and the loop's progress, replaced atomically."""
    import paddle

    with artifacts.atomic_dir(state_dir) as tmp:
        paddle.save(model.state_dict(), str(tmp / "model.pdparams"))
        paddle.save(optimizer.state_dict(), str(tmp / "optimizer.pdopt"))
        (tmp / STATE_FILE).write_text(json.dumps(progress_state, default=str), encoding="utf-8")


def mark_finished(out_dir: Path, settings: dict, steps: int, history: list[dict]) -> None:
    """Note in the best checkpoint that the training which made it ran to its end, with which settings, and the
    selection scores of all its evaluations (the curve a published report shows)."""
    path = out_dir / "training_state.json"
    state = artifacts.read_json(path)
    state["finished"] = {"settings_sha256": artifacts.json_sha256(settings), "steps": steps, "at": artifacts.now_iso()}
    state["history"] = history
    artifacts.write_json_atomic(path, state)


def finished_training(cfg: DictConfig) -> dict | None:
    """The fine-tuned checkpoint's training_state.json when a training with this config's settings ran to its
    end, else None."""
    state = artifacts.read_json(artifacts.finetuned_dir(cfg) / "training_state.json")
    done = state.get("finished") or {}
    return state if done.get("settings_sha256") == artifacts.json_sha256(resume_settings(cfg)) else None


def save_checkpoint(out_dir: Path, model, tokenizer, cfg: DictConfig, best: dict, n_params: int) -> None:
    with artifacts.atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_checkpoint_record(tmp, cfg, best, n_params)


def write_checkpoint_record(directory: Path, cfg: DictConfig, best: dict, n_params: int) -> None:
    """training_state.json: what a checkpoint is (task, model, how it was selected) and the task settings it was
    selected with."""
    (directory / "training_state.json").write_text(json.dumps({
        "task": cfg.task.name,
        "model": cfg.model.name,
        "model_init": cfg.model.init,
        "parameters": n_params,
        "best": best,
        "created_at": artifacts.now_iso(),
        "library_versions": artifacts.library_versions(),
        "config": OmegaConf.to_container(cfg.task, resolve=True),
    }, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
