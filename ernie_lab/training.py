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
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ernie_lab import artifacts
from ernie_lab.config import flatten
from ernie_lab.errors import ConfigError, DataError, MissingArtifactError
from ernie_lab.inference.batching import batches, unbatch
from ernie_lab.modeling import build_model, build_tokenizer, count_parameters
from ernie_lab.reporting import console, fmt, progress, table
from ernie_lab.runtime import data_parallel_rank
from ernie_lab.tasks import build_task
from ernie_lab.tracking import TrackedRun

STATE_FILE = "state.json"


def to_tensors(batch: dict[str, np.ndarray]) -> dict:
    import paddle

    return {k: paddle.to_tensor(v) for k, v in batch.items()}


def as_tuple(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def predict_dygraph(model, task, features: list[dict], batch_size: int) -> list[tuple[np.ndarray, ...]]:
    """Per-feature outputs of a dygraph model (used for selection during training and for export checks)."""
    import paddle

    model.eval()
    out = []
    with paddle.no_grad():
        for chunk in batches(features, batch_size):
            inputs = to_tensors(task.collate(chunk))
            arrays = [t.numpy() for t in as_tuple(model(inputs["input_ids"], token_type_ids=inputs["token_type_ids"]))]
            out.extend(unbatch(chunk, arrays, task.per_token_outputs))
    return out


def finetune(cfg: DictConfig, run: TrackedRun) -> dict:
    import paddle

    # Fresh parameter and optimizer-state names in every run (not counters shared by a whole process), so a
    # saved optimizer state finds its parameters again in a new process or in a later job of a sweep.
    with paddle.utils.unique_name.guard():
        return _finetune(cfg, run)


def _finetune(cfg: DictConfig, run: TrackedRun) -> dict:
    import paddle
    from paddlenlp.transformers import LinearDecayWithWarmup

    tc = cfg.train
    check_train_settings(cfg)
    state_dir = artifacts.train_state_dir(cfg)
    settings = resume_settings(cfg)
    saved = find_train_state(state_dir, tc.resume, settings)  # before any work: a wrong resume fails at once
    paddle.seed(int(cfg.seed))
    rng = np.random.default_rng(int(cfg.seed))
    tokenizer = build_tokenizer(cfg.model)
    task = build_task(cfg.task, tokenizer)

    train_examples = task.load("train")
    select_examples = task.load(cfg.task.selection_split)
    read_stats = {f"data.{k}": v for k, v in task.read_counts.items()}
    train_features = task.featurize(train_examples, training=True)
    train_stats = {f"data.train_{k}": v for k, v in task.data_stats().items()}
    select_features = task.featurize(select_examples, training=False)
    if not train_features:
        raise DataError(f"no training examples left in {cfg.task.data.dir} (after the data policies; see the warnings)")

    model = build_model(cfg.model, task.model_class(), task.head_config())
    n_params = count_parameters(model)
    rank, world = data_parallel_rank()
    lead = rank == 0  # the process that evaluates, saves and logs
    trained = model
    if world > 1:
        paddle.distributed.init_parallel_env()
        trained = paddle.DataParallel(model)  # averages gradients across the processes
    batch_size = int(tc.batch_size)
    steps_per_epoch = math.ceil(len(train_features) / batch_size)
    total_steps = steps_per_epoch * int(tc.epochs)
    if tc.max_steps is not None:
        total_steps = min(total_steps, int(tc.max_steps))
    scheduler = LinearDecayWithWarmup(float(tc.learning_rate), total_steps, float(tc.warmup_proportion))
    decay_params = [p.name for n, p in model.named_parameters() if not any(k in n for k in ("bias", "norm"))]
    if tc.freeze_word_embeddings:  # a pretrained table; updating its 40k rows densely costs ~25% of a small model's step
        model.base_model.embeddings.word_embeddings.weight.stop_gradient = True
    optimizer = paddle.optimizer.AdamW(
        learning_rate=scheduler,
        parameters=[p for p in model.parameters() if not p.stop_gradient],
        weight_decay=float(tc.weight_decay),
        apply_decay_param_fun=lambda name: name in decay_params,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(float(tc.max_grad_norm)) if tc.max_grad_norm else None,
    )
    run.log_params({
        "data.train_examples": len(train_examples),
        "data.train_features": len(train_features),
        "data.selection_examples": len(select_examples),
        "model.parameters": n_params,
        "train.total_steps": total_steps,
        "train.processes": world,
        **train_stats,
        **read_stats,
    })
    console.print(
        f"[bold]fine-tune[/] {cfg.task.name} on {cfg.model.name} ({cfg.model.init} init, {n_params / 1e6:.1f}M params): "
        f"{len(train_features)} train features, {total_steps} steps; selection on {cfg.task.selection_split} "
        f"({len(select_examples)} examples)"
    )

    out_dir = artifacts.finetuned_dir(cfg)
    best: dict = {"metric": -math.inf}
    history: list[dict] = []
    losses: list[float] = []
    step, start_epoch, first_batch = 0, 0, 0
    if saved is not None:  # every process resumes from the same state
        model.set_state_dict(paddle.load(str(state_dir / "model.pdparams")))
        optimizer.set_state_dict(paddle.load(str(state_dir / "optimizer.pdopt")))  # holds the LR scheduler's too
        rng.bit_generator.state = saved["epoch_rng"]  # redraws the interrupted epoch's order
        step, start_epoch, first_batch = saved["step"], saved["epoch"], saved["batch"]
        best, history, losses = saved["best"], saved["history"], saved["losses"]
        run.set_tags({"resumed_from_step": step})
        console.print(f"[bold]resume[/] from step {step} (epoch {start_epoch + 1}, batch {first_batch}) in {state_dir}")
    first_step = step
    started = time.perf_counter()

    def evaluate(epoch: int) -> None:
        if not lead:
            return
        outputs = predict_dygraph(model, task, select_features, int(cfg.benchmark.batch_size))
        predictions = task.postprocess(select_examples, select_features, outputs)
        scores = task.metrics(select_examples, predictions)
        run.log_metrics({f"select/{k}": v for k, v in scores.items()}, step=step)
        value = scores[task.primary_metric]
        history.append({"epoch": epoch, "step": step, **scores})
        if value > best["metric"]:
            best.update(metric=value, step=step, epoch=epoch, scores=scores)
            save_checkpoint(out_dir, model, tokenizer, cfg, best, n_params)
        model.train()

    def save_state(epoch: int, batch: int, epoch_rng: dict) -> None:
        """Everything resuming needs, with `epoch_rng` the numpy RNG state that draws `epoch`'s order."""
        if not lead:
            return
        save_train_state(state_dir, model, optimizer, {
            "settings": settings, "step": step, "epoch": epoch, "batch": batch, "epoch_rng": epoch_rng,
            "best": best, "history": history, "losses": losses, "saved_at": artifacts.now_iso(),
        })

    save_every = int(tc.save_every_steps) if tc.save_every_steps else 0
    with progress() as bar:
        job = bar.add_task("train", total=total_steps, completed=step, info="")
        for epoch in range(start_epoch, int(tc.epochs)):
            model.train()
            epoch_rng = rng.bit_generator.state
            order = rng.permutation(len(train_features))
            for batch_index in range(first_batch if epoch == start_epoch else 0, steps_per_epoch):
                if step >= total_steps:
                    break
                chunk = [train_features[i] for i in order[batch_index * batch_size : (batch_index + 1) * batch_size]]
                # this process's share of the global batch (a share left empty by a short last batch repeats its first
                # example: every process must take part in the gradient exchange)
                chunk = chunk[rank::world] or chunk[:1]
                batch = to_tensors(task.collate(chunk, with_labels=True))
                # Dropout draws from a stream seeded per step: paddle 2.6 cannot save its CPU generator's position
                # (a pickled get_rng_state() holds only the seed), so this is what makes a resumed run exact.
                paddle.seed(step_seed(int(cfg.seed), step))
                outputs = trained(batch["input_ids"], token_type_ids=batch["token_type_ids"])
                loss = task.loss(outputs, batch)
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.clear_grad()
                step += 1
                losses.append(float(loss))
                if step % int(tc.log_every_steps) == 0 or step == total_steps:
                    recent = float(np.mean(losses[-int(tc.log_every_steps):]))
                    run.log_metrics({"train/loss": recent, "train/lr": scheduler.get_lr()}, step=step)
                    bar.update(job, info=f"loss {recent:.4f}")
                bar.advance(job)
                if tc.eval_every_steps and step % int(tc.eval_every_steps) == 0:
                    evaluate(epoch)
                if save_every and step % save_every == 0 and step < total_steps and batch_index + 1 < steps_per_epoch:
                    save_state(epoch, batch_index + 1, epoch_rng)  # (the epoch's last step is saved at its end)
            evaluate(epoch)
            if step >= total_steps:
                break
            save_state(epoch + 1, 0, rng.bit_generator.state)
    if not lead:
        return {"checkpoint": str(out_dir), "rank": rank}  # rank 0 reports
    shutil.rmtree(state_dir, ignore_errors=True)  # finished: nothing to resume

    elapsed = time.perf_counter() - started
    first = float(np.mean(losses[: max(1, min(20, len(losses) // 5))]))
    last = float(np.mean(losses[-max(1, min(20, len(losses) // 5)):]))
    summary = {
        "train/loss_first": first,
        "train/loss_last": last,
        "train/seconds": elapsed,
        "train/steps": step,
        "train/samples_per_second": (step - first_step) * batch_size / elapsed,
        **{f"best/{k}": v for k, v in best["scores"].items()},
    }
    run.log_metrics(summary)
    run.log_dict({"history": history, "best": best}, "selection_history.json")
    console.print(table(
        f"fine-tuned {cfg.task.name} / {cfg.model.name}",
        ["epoch", "step", *best["scores"].keys()],
        [[h["epoch"], h["step"], *(fmt(h[k]) for k in best["scores"])] for h in history],
    ))
    console.print(f"best {task.primary_metric} {best['metric']:.2f} at step {best['step']}; checkpoint: {out_dir}")
    return {"checkpoint": str(out_dir), "loss_first": first, "loss_last": last, **best}


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
NOT_IN_FINGERPRINT = ("resume", "save_every_steps", "log_every_steps", "threads")


def resume_settings(cfg: DictConfig) -> dict:
    """The settings a saved state must match to be resumed (seed, task, model, train), flattened."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    train = {k: v for k, v in resolved["train"].items() if k not in NOT_IN_FINGERPRINT}
    return flatten({"seed": resolved["seed"], "task": resolved["task"], "model": resolved["model"], "train": train})


def find_train_state(state_dir: Path, resume, settings: dict) -> dict | None:
    """The saved state to resume from, or None to start over (`train.resume`: auto, true or false)."""
    path = state_dir / STATE_FILE
    if resume is False:
        return None
    if not path.is_file():
        if resume is True:
            raise MissingArtifactError(
                f"train.resume=true but {state_dir} holds no training state to resume; "
                "use train.resume=auto (or false) to start from the beginning"
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
            "or start over with train.resume=auto (or false)"
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


def save_checkpoint(out_dir: Path, model, tokenizer, cfg: DictConfig, best: dict, n_params: int) -> None:
    with artifacts.atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "training_state.json").write_text(json.dumps({
            "task": cfg.task.name,
            "model": cfg.model.name,
            "model_init": cfg.model.init,
            "parameters": n_params,
            "best": best,
            "created_at": artifacts.now_iso(),
            "library_versions": artifacts.library_versions(),
            "config": OmegaConf.to_container(cfg.task, resolve=True),
        }, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
