"""Fine-tuning in dygraph: train on `train`, select on the task's selection split, keep the best checkpoint."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ernie_lab import artifacts
from ernie_lab.inference.batching import batches, unbatch
from ernie_lab.modeling import build_model, build_tokenizer, count_parameters
from ernie_lab.reporting import console, fmt, progress, table
from ernie_lab.tasks import build_task
from ernie_lab.tracking import TrackedRun


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
    from paddlenlp.transformers import LinearDecayWithWarmup

    paddle.seed(int(cfg.seed))
    rng = np.random.default_rng(int(cfg.seed))
    tokenizer = build_tokenizer(cfg.model)
    task = build_task(cfg.task, tokenizer)

    train_examples = task.load("train")
    select_examples = task.load(cfg.task.selection_split)
    train_features = task.featurize(train_examples, training=True)
    train_stats = {f"data.train_{k}": v for k, v in task.data_stats().items()}
    select_features = task.featurize(select_examples, training=False)

    model = build_model(cfg.model, task.model_class(), task.head_config())
    n_params = count_parameters(model)
    tc = cfg.train
    steps_per_epoch = math.ceil(len(train_features) / tc.batch_size)
    total_steps = steps_per_epoch * int(tc.epochs)
    if tc.max_steps is not None:
        total_steps = min(total_steps, int(tc.max_steps))
    scheduler = LinearDecayWithWarmup(float(tc.learning_rate), total_steps, float(tc.warmup_proportion))
    decay_params = [p.name for n, p in model.named_parameters() if not any(k in n for k in ("bias", "norm"))]
    optimizer = paddle.optimizer.AdamW(
        learning_rate=scheduler,
        parameters=model.parameters(),
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
        **train_stats,
    })
    console.print(
        f"[bold]fine-tune[/] {cfg.task.name} on {cfg.model.name} ({cfg.model.init} init, {n_params / 1e6:.1f}M params): "
        f"{len(train_features)} train features, {total_steps} steps; selection on {cfg.task.selection_split} "
        f"({len(select_examples)} examples)"
    )

    out_dir = artifacts.finetuned_dir(cfg)
    best: dict = {"metric": -math.inf}
    history = []
    step = 0
    started = time.perf_counter()

    def evaluate(epoch: int) -> None:
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

    losses: list[float] = []
    with progress() as bar:
        job = bar.add_task("train", total=total_steps, info="")
        for epoch in range(int(tc.epochs)):
            model.train()
            order = rng.permutation(len(train_features))
            for start in range(0, len(order), int(tc.batch_size)):
                chunk = [train_features[i] for i in order[start : start + int(tc.batch_size)]]
                batch = to_tensors(task.collate(chunk, with_labels=True))
                outputs = model(batch["input_ids"], token_type_ids=batch["token_type_ids"])
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
                if step >= total_steps:
                    break
            evaluate(epoch)
            if step >= total_steps:
                break

    elapsed = time.perf_counter() - started
    first = float(np.mean(losses[: max(1, min(20, len(losses) // 5))]))
    last = float(np.mean(losses[-max(1, min(20, len(losses) // 5)):]))
    summary = {
        "train/loss_first": first,
        "train/loss_last": last,
        "train/seconds": elapsed,
        "train/steps": step,
        "train/samples_per_second": step * int(tc.batch_size) / elapsed,
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
