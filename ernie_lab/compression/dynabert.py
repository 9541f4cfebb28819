"""DynaBERT width pruning of a fine-tuned ERNIE, in four steps:

1. importance: how much the task loss depends on each attention head and FFN neuron, measured on held-out
   examples of train (never the eval split);
2. reorder: heads and neurons of every layer sorted by importance, so that "the first k" is always the most
   important k (a permutation: the model computes exactly the same function);
3. width-adaptive distillation: the reordered model learns from the frozen fine-tuned teacher at every width
   in `prune.train_widths` at once, the narrower widths sharing the first heads/neurons of the wider ones;
4. slice: the chosen `prune.width_mult` cut out as a physically smaller model (fewer heads of the same head
   size, narrower FFN) that exports like any other.

Widths are simulated during training by masking (a head's context or a neuron's activation multiplied by 0),
which gives the sliced model's outputs exactly; the sliced model is checked against the masked one.
"""
from __future__ import annotations

import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ernie_lab import artifacts
from ernie_lab.config import flatten
from ernie_lab.errors import ConfigError
from ernie_lab.inference.batching import batches
from ernie_lab.reporting import console, fmt, progress, table

STATE_FILE = "dynabert_state.json"


# ---- structure ----------------------------------------------------------------------------------------------
def encoder_layers(model) -> list:
    """The transformer layers of any PaddleNLP ERNIE task model, in order."""
    import paddle

    layers = [m for m in model.sublayers() if isinstance(m, paddle.nn.TransformerEncoderLayer)]
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no TransformerEncoderLayer to prune")
    return layers


@dataclass(frozen=True)
class Width:
    """How many heads and FFN neurons a width multiplier keeps in a layer (at least one of each)."""

    heads: int
    neurons: int

    @classmethod
    def of(cls, layer, width_mult: float) -> "Width":
        return cls(max(1, round(layer.self_attn.num_heads * width_mult)),
                   max(1, round(layer.linear1.weight.shape[1] * width_mult)))


def width_label(width_mult: float) -> str:
    return f"w{float(width_mult):.2f}"


def check_widths(prune: DictConfig) -> list[float]:
    widths = sorted({float(w) for w in prune.train_widths}, reverse=True)
    if not widths or any(not 0.0 < w <= 1.0 for w in widths):
        raise ConfigError(f"prune.train_widths={list(prune.train_widths)}: each width must be in (0, 1]")
    if not any(math.isclose(float(prune.width_mult), w, abs_tol=1e-6) for w in widths):
        raise ConfigError(
            f"prune.width_mult={prune.width_mult} was not trained; choose one of prune.train_widths={widths} "
            f"or add it there"
        )
    return widths


# ---- 1. importance --------------------------------------------------------------------------------------------
def importance(model, task, features: list[dict], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Head importance [layers, heads] and neuron importance [layers, ffn]: |dL/d(gate)| summed over batches,
    where a gate scales one head's context (or one neuron's activation) and L is the task loss.

    The gradient of a gate is the dot product of the matching rows of the next projection with their gradient
    (out_proj rows for a head, linear2 rows for a neuron), so no gates need to be inserted."""
    from ernie_lab.training import to_tensors

    layers = encoder_layers(model)
    heads = np.zeros((len(layers), layers[0].self_attn.num_heads))
    neurons = np.zeros((len(layers), layers[0].linear1.weight.shape[1]))
    model.eval()  # no dropout: importance of the function the model computes
    for chunk in batches(features, batch_size):
        batch = to_tensors(task.collate(chunk, with_labels=True))
        loss = task.loss(model(batch["input_ids"], token_type_ids=batch["token_type_ids"]), batch)
        loss.backward()
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            out_w = attn.out_proj.weight  # [heads*head_dim, hidden]
            per_row = (out_w * out_w.grad).sum(axis=1).reshape([attn.num_heads, attn.head_dim]).sum(axis=1)
            heads[i] += np.abs(per_row.numpy())
            ffn_w = layer.linear2.weight  # [ffn, hidden]
            neurons[i] += np.abs((ffn_w * ffn_w.grad).sum(axis=1).numpy())
        model.clear_gradients()
    # no zero-filled gradients left behind: an optimizer steps (and decays) every parameter that has one, and a
    # resumed distillation, which skips this, must see the same parameters without a gradient
    for param in model.parameters():
        param.clear_gradient(False)
    return heads, neurons


# ---- 2. reorder ---------------------------------------------------------------------------------------------
def _permute(param, index: np.ndarray, axis: int) -> None:
    import paddle

    param.set_value(paddle.index_select(param, paddle.to_tensor(index, dtype="int64"), axis=axis))


def reorder(model, heads: np.ndarray, neurons: np.ndarray) -> None:
    """Sort each layer's heads and neurons by importance, most important first (the function is unchanged)."""
    import paddle

    with paddle.no_grad():
        for layer, head_score, neuron_score in zip(encoder_layers(model), heads, neurons):
            attn = layer.self_attn
            head_order = np.argsort(-head_score, kind="stable")
            columns = (head_order[:, None] * attn.head_dim + np.arange(attn.head_dim)[None, :]).reshape(-1)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                _permute(proj.weight, columns, axis=1)
                _permute(proj.bias, columns, axis=0)
            _permute(attn.out_proj.weight, columns, axis=0)
            neuron_order = np.argsort(-neuron_score, kind="stable")
            _permute(layer.linear1.weight, neuron_order, axis=1)
            _permute(layer.linear1.bias, neuron_order, axis=0)
            _permute(layer.linear2.weight, neuron_order, axis=0)


# ---- 3. width-adaptive model -----------------------------------------------------------------------------------
class WidthMasks:
    """Makes a reordered full-width model behave as its first-k-heads / first-k-neurons sub-network.

    Forward pre-hooks zero the context of dropped heads before out_proj and the activations of dropped neurons
    before linear2, which is exactly what slicing those rows away computes."""

    def __init__(self, model):
        import paddle

        self.layers = encoder_layers(model)
        self.width = 1.0
        self.masks: dict[float, list[tuple]] = {}
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.self_attn.out_proj.register_forward_pre_hook(self._hook(i, 0)))
            self.handles.append(layer.linear2.register_forward_pre_hook(self._hook(i, 1)))
        self._paddle = paddle

    def _mask(self, width: float) -> list[tuple]:
        if width not in self.masks:
            per_layer = []
            for layer in self.layers:
                keep = Width.of(layer, width)
                attn = layer.self_attn
                head_mask = np.zeros(attn.num_heads * attn.head_dim, dtype="float32")
                head_mask[: keep.heads * attn.head_dim] = 1.0
                neuron_mask = np.zeros(layer.linear1.weight.shape[1], dtype="float32")
                neuron_mask[: keep.neurons] = 1.0
                per_layer.append((self._paddle.to_tensor(head_mask), self._paddle.to_tensor(neuron_mask)))
            self.masks[width] = per_layer
        return self.masks[width]

    def _hook(self, layer_index: int, which: int):
        def hook(_layer, inputs):
            if self.width >= 1.0:
                return None
            return (inputs[0] * self._mask(self.width)[layer_index][which],) + tuple(inputs[1:])
        return hook

    @contextmanager
    def at(self, width: float) -> Iterator[None]:
        previous, self.width = self.width, float(width)
        try:
            yield
        finally:
            self.width = previous

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class HiddenStates:
    """Collects every encoder layer's output during a forward pass (for hidden-state distillation)."""

    def __init__(self, model):
        self.outputs: list = []
        self.handles = [layer.register_forward_post_hook(self._keep) for layer in encoder_layers(model)]

    def _keep(self, _layer, _inputs, output):
        self.outputs.append(output)

    def take(self) -> list:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def distillation_loss(student, teacher, token_mask, temperature: float):
    """Soft cross-entropy of every output against the teacher's, over the last axis. Per-token class logits
    ([batch, tokens, classes]) are averaged over real tokens only."""
    import paddle
    import paddle.nn.functional as F

    total = 0.0
    for s, t in zip(student, teacher):
        soft = F.softmax(t / temperature, axis=-1)
        per_row = -(soft * F.log_softmax(s / temperature, axis=-1)).sum(axis=-1)
        if per_row.ndim == 2:  # one value per token
            mask = token_mask.astype(per_row.dtype)
            total = total + (per_row * mask).sum() / paddle.clip(mask.sum(), min=1.0)
        else:
            total = total + per_row.mean()
    return total * temperature ** 2


class WidthDistillation:
    """Distil the teacher into every width of the student, one optimizer step per batch covering all widths.

    Resumable like fine-tuning: every `prune.train.save_every_steps` steps the student, the optimizer (with its
    LR schedule), the loop's position and the ranking that reordered the student are saved in `state_dir`; a
    later run with the same settings continues from there and ends with the same weights. Dropout draws from a
    stream seeded per step (training.step_seed), since paddle cannot save its CPU generator's position."""

    def __init__(self, student, teacher, task, features: list[dict], prune: DictConfig, widths: list[float],
                 seed: int, run, state_dir: Path, settings: dict):
        from ernie_lab.training import build_optimizer, count_steps

        self.student, self.task, self.features, self.tc, self.widths = student, task, features, prune.train, widths
        self.seed, self.run_log, self.state_dir, self.settings = seed, run, state_dir, settings
        self.steps_per_epoch, self.total_steps = count_steps(len(features), self.tc)
        if self.total_steps < 1:
            raise ConfigError(f"prune.train gives no steps (epochs={self.tc.epochs}, max_steps={self.tc.max_steps})")
        self.optimizer, self.scheduler = build_optimizer(student, self.tc, self.total_steps)
        self.distil = Distillation(student, teacher, task, prune.distill, widths)
        self.rng = np.random.default_rng(seed)
        self.step, self.epoch, self.first_batch = 0, 0, 0
        self.losses: list[float] = []
        self.seconds_before = 0.0

    def resume(self, saved: dict) -> None:
        import paddle

        self.student.set_state_dict(paddle.load(str(self.state_dir / "model.pdparams")))
        self.optimizer.set_state_dict(paddle.load(str(self.state_dir / "optimizer.pdopt")))  # holds the scheduler's too
        self.rng.bit_generator.state = saved["epoch_rng"]  # redraws the interrupted epoch's order
        self.step, self.epoch, self.first_batch = saved["step"], saved["epoch"], saved["batch"]
        self.losses, self.seconds_before = saved["losses"], float(saved.get("seconds", 0.0))
        self.run_log.set_tags({"prune_resumed_from_step": self.step})
        console.print(f"[bold]prune[/] resume distillation from step {self.step} of {self.total_steps} in {self.state_dir}")

    def epoch_order(self) -> np.ndarray:
        """The next epoch's feature order, drawn from `self.rng` (a resumed run redraws it)."""
        from ernie_lab.training import epoch_order

        return epoch_order(self.rng, self.features, int(self.tc.batch_size), bool(self.tc.group_by_length))

    def run(self, ranking: dict) -> dict:
        """Train to the last step; `ranking` (the importance that reordered the student) goes into every saved state."""
        import paddle

        from ernie_lab.training import loss_ends, save_train_state, step_seed

        tc, batch_size = self.tc, int(self.tc.batch_size)
        every, save_every = int(tc.log_every_steps), int(tc.save_every_steps or 0)
        started = time.perf_counter()
        try:
            with progress() as bar:
                job = bar.add_task(f"distil widths {', '.join(width_label(w) for w in self.widths)}",
                                   total=self.total_steps, completed=self.step, info="")
                while self.step < self.total_steps:
                    epoch_rng = self.rng.bit_generator.state
                    order = self.epoch_order()
                    for batch_index in range(self.first_batch, self.steps_per_epoch):
                        if self.step >= self.total_steps:
                            break
                        self.student.train()
                        paddle.seed(step_seed(self.seed, self.step))
                        chunk = order[batch_index * batch_size : (batch_index + 1) * batch_size]
                        self.losses.append(self.distil.step([self.features[i] for i in chunk]))
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.clear_grad()
                        self.step += 1
                        if self.step % every == 0 or self.step == self.total_steps:
                            recent = float(np.mean(self.losses[-every:]))
                            self.run_log.log_metrics({"prune/distill_loss": recent, "prune/lr": self.scheduler.get_lr()},
                                                     step=self.step)
                            bar.update(job, info=f"loss {recent:.4f}")
                        bar.advance(job)
                        # the last step too: what follows it (scoring every width, saving the model) takes
                        # minutes on a large task, and a stop there must not cost the steps since the last save
                        if save_every and (self.step % save_every == 0 or self.step == self.total_steps):
                            save_train_state(self.state_dir, self.student, self.optimizer, {
                                "settings": self.settings, "step": self.step, "epoch": self.epoch,
                                "batch": batch_index + 1, "epoch_rng": epoch_rng, "losses": self.losses,
                                "ranking": ranking, "saved_at": artifacts.now_iso(),
                                "seconds": self.seconds_before + time.perf_counter() - started,
                            })
                    self.epoch, self.first_batch = self.epoch + 1, 0
        finally:
            self.distil.remove_hooks()
        first, last = loss_ends(self.losses)
        return {"steps": self.step, "seconds": self.seconds_before + time.perf_counter() - started,
                "loss_first": first, "loss_last": last}


class Distillation:
    """DynaBERT's loss for one batch: the teacher's outputs (soft cross-entropy) and, weighted, its hidden states
    (MSE per layer), for every width of the student in turn."""

    def __init__(self, student, teacher, task, distill: DictConfig, widths: list[float]):
        self.student, self.teacher, self.task, self.widths = student, teacher, task, widths
        self.masks, self.student_hidden = WidthMasks(student), HiddenStates(student)
        self.teacher_hidden = HiddenStates(teacher)
        self.hidden_weight, self.temperature = float(distill.hidden_weight), float(distill.temperature)
        teacher.eval()

    def step(self, chunk: list[dict]) -> float:
        """Accumulate the gradients of every width on `chunk`; the mean loss over the widths."""
        import paddle
        import paddle.nn.functional as F

        from ernie_lab.training import as_tuple, to_tensors

        batch = to_tensors(self.task.collate(chunk))
        token_mask = batch["input_ids"] != self.task.tokenizer.pad_token_id
        with paddle.no_grad():
            teacher_out = as_tuple(self.teacher(batch["input_ids"], token_type_ids=batch["token_type_ids"]))
            teacher_states = self.teacher_hidden.take()
        total = 0.0
        for width in self.widths:
            with self.masks.at(width):
                out = as_tuple(self.student(batch["input_ids"], token_type_ids=batch["token_type_ids"]))
            loss = distillation_loss(out, teacher_out, token_mask, self.temperature)
            states = self.student_hidden.take()
            if self.hidden_weight:
                loss = loss + self.hidden_weight * sum(F.mse_loss(s, t) for s, t in zip(states, teacher_states))
            loss.backward()  # gradients of all widths add up before the one step
            total += float(loss)
        return total / len(self.widths)

    def remove_hooks(self) -> None:
        self.masks.remove()
        self.student_hidden.remove()
        self.teacher_hidden.remove()


def evaluate_widths(model, task, examples: list[dict], widths: list[float], batch_size: int) -> dict[str, dict]:
    """The task metric of every width of a width-adaptive model (dygraph, masked)."""
    from ernie_lab.training import predict_dygraph

    features = task.featurize(examples, training=False)
    masks = WidthMasks(model)
    scores = {}
    try:
        for width in widths:
            with masks.at(width):
                outputs = predict_dygraph(model, task, features, batch_size)
            scores[width_label(width)] = task.metrics(examples, task.postprocess(examples, features, outputs))
    finally:
        masks.remove()
    return scores


# ---- 4. slice -----------------------------------------------------------------------------------------------
def _linear_from(weight: np.ndarray, bias: np.ndarray | None):
    import paddle

    layer = paddle.nn.Linear(weight.shape[0], weight.shape[1], bias_attr=None if bias is not None else False)
    layer.weight.set_value(weight)
    if bias is not None:
        layer.bias.set_value(bias)
    return layer


def slice_to_width(model, width_mult: float) -> list[dict]:
    """Cut every layer of a reordered model down to its first heads/neurons in place; head size is kept
    (8 heads of 64 for 2/3 of Medium, not 8 heads of 96). Returns the kept sizes per layer."""
    kept = []
    for layer in encoder_layers(model):
        keep = Width.of(layer, width_mult)
        attn = layer.self_attn
        cols = keep.heads * attn.head_dim
        for name in ("q_proj", "k_proj", "v_proj"):
            proj = getattr(attn, name)
            setattr(attn, name, _linear_from(proj.weight.numpy()[:, :cols], proj.bias.numpy()[:cols]))
        attn.out_proj = _linear_from(attn.out_proj.weight.numpy()[:cols], attn.out_proj.bias.numpy())
        attn.num_heads = keep.heads  # head_dim stays: the reshape in MultiHeadAttention uses both
        layer.linear1 = _linear_from(layer.linear1.weight.numpy()[:, : keep.neurons], layer.linear1.bias.numpy()[: keep.neurons])
        layer.linear2 = _linear_from(layer.linear2.weight.numpy()[: keep.neurons], layer.linear2.bias.numpy())
        kept.append({"heads": keep.heads, "head_size": attn.head_dim, "ffn": keep.neurons})
    model.eval()
    return kept


# ---- the prune step ---------------------------------------------------------------------------------------------
# prune.* keys that change nothing the width-adaptive model is: any trained width can be cut from the same model,
# and resuming or saving a distillation ends with the same weights.
NOT_IN_SETTINGS_KEY = ("width_mult", "reuse")
NOT_IN_SETTINGS_KEY_TRAIN = ("save_every_steps", "resume")


def key_inputs(cfg: DictConfig, source_state: dict) -> dict:
    """What a width-adaptive model depends on: pruning settings and the exact fine-tuned checkpoint."""
    prune = OmegaConf.to_container(cfg.prune, resolve=True)
    for key in NOT_IN_SETTINGS_KEY:
        prune.pop(key, None)
    for key in NOT_IN_SETTINGS_KEY_TRAIN:
        prune["train"].pop(key, None)
    return {"prune": prune, "source": source_state.get("created_at"), "seed": int(cfg.seed),
            "heldout": OmegaConf.to_container(cfg.task.data, resolve=True)}


def settings_key(cfg: DictConfig, source_state: dict) -> str:
    return artifacts.json_sha256(key_inputs(cfg, source_state))[:16]


def width_adaptive_model(cfg: DictConfig, task, source: Path, run) -> tuple[object, dict]:
    """The reordered, distilled full-width model: reused from disk when the same settings made it before
    (so dynabert and dynabert_ptq, or several widths, train once), otherwise built and saved atomically."""
    from ernie_lab.modeling import load_finetuned

    prune = cfg.prune
    widths = check_widths(prune)  # a bad width fails before the reuse check
    source_state = artifacts.read_json(source / "training_state.json")
    key = settings_key(cfg, source_state)
    out_dir = artifacts.width_adaptive_dir(cfg)
    state = artifacts.read_json(out_dir / STATE_FILE)
    if prune.reuse and state.get("settings_key") == key and (out_dir / "config.json").is_file():
        console.print(f"[bold]prune[/] reusing the width-adaptive model in {out_dir} (same checkpoint and settings)")
        run.set_tags({"prune_reused": "true"})
        return load_finetuned(out_dir, task.model_class()), state

    resume_settings = {k: v for k, v in flatten(key_inputs(cfg, source_state)).items()
                       if k not in ("prune.train.log_every_steps",)}  # the key keeps it: made before this was left out
    student, state = build_width_adaptive(cfg, task, source, widths, run, resume_settings)
    state.update(settings_key=key, source_checkpoint=str(source), source_created_at=source_state.get("created_at"))
    with artifacts.atomic_dir(out_dir) as tmp:
        student.save_pretrained(str(tmp))
        task.tokenizer.save_pretrained(str(tmp))
        artifacts.write_json_atomic(tmp / STATE_FILE, state)
    shutil.rmtree(artifacts.distill_state_dir(cfg), ignore_errors=True)  # the model it would resume is saved
    return student, state


def build_width_adaptive(cfg: DictConfig, task, source: Path, widths: list[float], run,
                         settings: dict) -> tuple[object, dict]:
    """DynaBERT's three steps on the fine-tuned checkpoint at `source`: rank heads and neurons on held-out
    examples, reorder, distil every width from the unchanged teacher; then score each width (logged, printed).
    A distillation stopped part-way with the same `settings` continues from its saved state."""
    import paddle

    from ernie_lab.modeling import load_finetuned
    from ernie_lab.training import find_train_state

    prune = cfg.prune
    state_dir = artifacts.distill_state_dir(cfg)
    saved = find_train_state(state_dir, prune.train.resume, settings, option="prune.train.resume")
    if cfg.runtime.device == "cpu":
        from ernie_lab.runtime import claim_threads

        claim_threads(int(cfg.train.threads))  # after a predictor has run in this process (ernie_lab.runtime)
    paddle.seed(int(cfg.seed))
    n_importance = int(prune.importance.samples)
    heldout = task.load("heldout")
    if len(heldout) < n_importance:
        raise ConfigError(
            f"prune.importance.samples={n_importance} but the held-out slice has {len(heldout)} examples "
            f"(task.data.heldout_size / task.data.limit.heldout)"
        )
    # Fresh parameter names: a resumed process, which may have built other models first, must give the
    # student's parameters the names its saved optimizer state uses.
    with paddle.utils.unique_name.guard():
        teacher = load_finetuned(source, task.model_class(), expected_task=cfg.task.name)
        student = load_finetuned(source, task.model_class(), expected_task=cfg.task.name)
        if saved is None:
            console.print(f"[bold]prune[/] importance of heads and neurons on {n_importance} held-out examples")
            # training=True: importance needs the labels of the held-out examples. At most n_importance features: a
            # CMRC2018 question makes several windows, and each costs a backward pass.
            heads, neurons = importance(student, task, task.featurize(heldout[:n_importance], training=True)[:n_importance],
                                        int(prune.importance.batch_size))
            reorder(student, heads, neurons)
            ranking = {"head_importance": heads.round(6).tolist(),
                       "neuron_importance_sorted_top": [sorted(row, reverse=True)[:8] for row in neurons.round(6).tolist()]}
        else:
            ranking = saved["ranking"]  # the saved student is reordered already
        if cfg.train.fused_attention:  # distillation is training: the same cheaper attention (ernie_lab.fused_attention)
            from ernie_lab import fused_attention

            fused_attention.enable(student)
            fused_attention.enable(teacher)

        train_features = task.featurize(task.load("train"), training=True)
        console.print(f"[bold]prune[/] distilling {len(train_features)} train features into widths {widths}")
        distillation = WidthDistillation(student, teacher, task, train_features, prune, widths, int(cfg.seed), run,
                                         state_dir, settings)
        if saved is not None:
            distillation.resume(saved)
        training = distillation.run(ranking)

    eval_examples = heldout[n_importance : n_importance + int(prune.eval_samples)] or heldout[: int(prune.eval_samples)]
    scores = evaluate_widths(student, task, eval_examples, widths, int(cfg.benchmark.batch_size))
    teacher_scores = evaluate_widths(teacher, task, eval_examples, [1.0], int(cfg.benchmark.batch_size))[width_label(1.0)]
    metric = task.primary_metric
    run.log_metrics({
        "prune/loss_first": training["loss_first"], "prune/loss_last": training["loss_last"],
        "prune/seconds": training["seconds"], f"prune/heldout_{metric}_teacher": teacher_scores[metric],
        **{f"prune/heldout_{metric}_{label}": s[metric] for label, s in scores.items()},
    })
    console.print(table(
        f"held-out {metric} by width ({len(eval_examples)} examples, dygraph)", ["model", metric],
        [("teacher (fine-tuned)", fmt(teacher_scores[metric]))] + [(label, fmt(s[metric])) for label, s in scores.items()],
    ))
    return student, {
        "train_widths": widths,
        "training": training,
        "heldout_eval_examples": len(eval_examples),
        "heldout_scores": {"teacher": teacher_scores, **scores},
        **ranking,
        "settings": OmegaConf.to_container(prune, resolve=True),
        "created_at": artifacts.now_iso(),
    }


def prune_step(cfg: DictConfig, task, source: Path, run) -> tuple[object, dict]:
    """The pruned dygraph model at `prune.width_mult` and what the manifest says about it."""
    from ernie_lab.modeling import count_parameters

    model, state = width_adaptive_model(cfg, task, source, run)
    full_parameters = count_parameters(model)
    full_heads = [layer.self_attn.num_heads for layer in encoder_layers(model)]
    full_ffn = [layer.linear1.weight.shape[1] for layer in encoder_layers(model)]
    width = float(cfg.prune.width_mult)
    kept = slice_to_width(model, width)
    info = {
        "method": "dynabert",
        "width_mult": width,
        "full_heads_per_layer": full_heads,
        "full_ffn_per_layer": full_ffn,
        "heads_per_layer": [k["heads"] for k in kept],
        "head_size": kept[0]["head_size"],
        "ffn_per_layer": [k["ffn"] for k in kept],
        "full_parameters": full_parameters,
        "pruned_parameters": count_parameters(model),
        "width_adaptive_model": str(artifacts.width_adaptive_dir(cfg)),
        "train_widths": state.get("train_widths"),
        "heldout_scores": state.get("heldout_scores"),
    }
    console.print(
        f"[bold]prune[/] {width_label(width)}: heads {full_heads[0]} -> {kept[0]['heads']}, FFN {full_ffn[0]} -> "
        f"{kept[0]['ffn']}, parameters {full_parameters / 1e6:.2f}M -> {info['pruned_parameters'] / 1e6:.2f}M"
    )
    return model, info
