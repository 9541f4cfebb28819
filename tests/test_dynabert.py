"""DynaBERT width pruning: the reorder is a permutation, masks equal slicing, importance finds what matters,
distillation lowers its loss, and compress.py writes a physically smaller export that infer.py runs."""
from __future__ import annotations

import numpy as np
import pytest

from ernie_lab import artifacts
from ernie_lab.errors import ConfigError
from tests.conftest import isolated_overrides, make_cfg, run_stage

TINY = [
    "model=tiny",
    "task.data.limit.train=256",
    "task.data.limit.eval=128",
    "task.data.heldout_size=96",
    "train.epochs=4",
    "train.batch_size=16",
    "train.learning_rate=3e-3",
    "prune.importance.samples=48",
    "prune.eval_samples=48",
    "prune.train.max_steps=30",
    "prune.train.epochs=2",
    "prune.train.batch_size=16",
    "prune.train.learning_rate=2e-3",
    "quantize.batch_size=8",
    "quantize.batch_nums=2",
    "benchmark.warmup_batches=1",
]


def cfg_for(workdir, *extra):
    return make_cfg(isolated_overrides(workdir) + TINY + list(extra))


@pytest.fixture(scope="module")
def tiny_model():
    import paddle
    from paddlenlp.transformers import ErnieForSequenceClassification

    from ernie_lab.modeling import ernie_config

    paddle.seed(0)
    model = ErnieForSequenceClassification(ernie_config(make_cfg(["model=tiny"]).model, num_labels=15))  # TNEWS's 15 classes
    model.eval()
    return model


def random_batch(seed=0, batch=4, length=12):
    import paddle

    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 1000, size=(batch, length))
    return paddle.to_tensor(ids), paddle.to_tensor(np.zeros_like(ids))


def outputs(model, ids, types):
    import paddle

    with paddle.no_grad():
        return model(ids, token_type_ids=types).numpy()


def clone(model):
    import copy

    return copy.deepcopy(model)


def test_reorder_is_a_permutation_of_heads_and_neurons(tiny_model):
    from ernie_lab.compression.dynabert import encoder_layers, reorder

    model = clone(tiny_model)
    ids, types = random_batch()
    before = outputs(model, ids, types)
    layers = encoder_layers(model)
    rng = np.random.default_rng(1)
    heads = rng.random((len(layers), layers[0].self_attn.num_heads))
    neurons = rng.random((len(layers), layers[0].linear1.weight.shape[1]))
    q_before = layers[0].self_attn.q_proj.weight.numpy().copy()
    reorder(model, heads, neurons)
    assert not np.allclose(q_before, layers[0].self_attn.q_proj.weight.numpy())  # weights did move
    np.testing.assert_allclose(outputs(model, ids, types), before, atol=1e-5)


@pytest.mark.parametrize("width", [0.75, 0.5, 0.25])
def test_masked_width_equals_the_sliced_model(tiny_model, width):
    from ernie_lab.compression.dynabert import WidthMasks, encoder_layers, slice_to_width

    model = clone(tiny_model)
    ids, types = random_batch(seed=2)
    full = outputs(model, ids, types)
    masks = WidthMasks(model)
    with masks.at(width):
        masked = outputs(model, ids, types)
    masks.remove()
    assert not np.allclose(masked, full, atol=1e-4)  # the mask changes the function
    kept = slice_to_width(model, width)
    layer = encoder_layers(model)[0]
    assert kept[0]["heads"] == round(4 * width) and kept[0]["head_size"] == 16
    assert layer.self_attn.q_proj.weight.shape == [64, round(4 * width) * 16]
    assert layer.linear1.weight.shape == [64, round(128 * width)]
    np.testing.assert_allclose(outputs(model, ids, types), masked, atol=1e-5)


def test_importance_ranks_a_silenced_head_last(tiny_model, tokenizer):
    import paddle

    from ernie_lab.compression.dynabert import encoder_layers, importance
    from ernie_lab.tasks import build_task

    model = clone(tiny_model)
    cfg = make_cfg(["model=tiny", "task.data.heldout_size=32", "task.data.limit.heldout=16"])
    task = build_task(cfg.task, tokenizer)
    features = task.featurize(task.load("heldout"), training=True)
    attn, ffn = encoder_layers(model)[1].self_attn, encoder_layers(model)[1].linear2
    with paddle.no_grad():  # head 2 of layer 1 and neuron 7 contribute nothing: their importance must be 0
        w = attn.out_proj.weight.numpy()
        w[2 * attn.head_dim : 3 * attn.head_dim] = 0
        attn.out_proj.weight.set_value(w)
        w = ffn.weight.numpy()
        w[7] = 0
        ffn.weight.set_value(w)
    heads, neurons = importance(model, task, features, 8)
    assert heads.shape == (2, 4) and neurons.shape == (2, 128)
    assert heads[1, 2] == 0 and heads[1].argmin() == 2 and (np.delete(heads[1], 2) > 0).all()
    assert neurons[1, 7] == 0 and (heads[0] > 0).all()


def test_width_settings_are_checked():
    from ernie_lab.compression.dynabert import check_widths

    assert check_widths(make_cfg([]).prune) == [1.0, 0.75, 0.6667]
    with pytest.raises(ConfigError, match=r"prune.width_mult=0.5 was not trained.*train_widths"):
        check_widths(make_cfg(["prune.width_mult=0.5"]).prune)
    with pytest.raises(ConfigError, match="in \\(0, 1\\]"):
        check_widths(make_cfg(["prune.train_widths=[1.5]", "prune.width_mult=1.5"]).prune)


# ---- through compress.py and infer.py on real TNEWS lines -----------------------------------------------------
def test_distillation_batches_follow_group_by_length(tiny_model, tmp_path):
    """With train.group_by_length a distillation epoch is a permutation whose batches pad far less than a random one's."""
    from ernie_lab.compression.dynabert import WidthDistillation

    lengths = np.random.default_rng(0).integers(5, 120, size=320)
    features = [{"input_ids": [1] * int(n)} for n in lengths]

    def epoch_order(grouped: bool) -> np.ndarray:
        prune = make_cfg(["model=tiny", f"train.group_by_length={grouped}", "prune.train.batch_size=16"]).prune
        assert prune.train.group_by_length is grouped  # follows fine-tuning's setting
        distillation = WidthDistillation(clone(tiny_model), clone(tiny_model), None, features, prune, [1.0, 0.6667],
                                         seed=0, run=None, state_dir=tmp_path, settings={})
        try:
            return distillation.epoch_order()
        finally:
            distillation.distil.remove_hooks()

    def padded_positions(order: np.ndarray) -> int:
        return int(sum(lengths[order[i : i + 16]].max() * 16 for i in range(0, len(order), 16)))

    grouped, shuffled = epoch_order(True), epoch_order(False)
    assert sorted(grouped.tolist()) == list(range(len(features)))
    assert padded_positions(grouped) < 0.7 * padded_positions(shuffled)


def test_a_distillation_stopped_after_its_last_step_resumes_there(tiny_model, tmp_path):
    """The state saved at the last step stands for the whole distillation: scoring the widths and saving the model
    come after it (minutes on a large task), and a stop there resumes with no step run again."""
    import json

    from ernie_lab.compression.dynabert import WidthDistillation
    from ernie_lab.training import STATE_FILE
    from tests.conftest import RecordingRun, task_for

    cfg = make_cfg(["model=tiny", "task.data.limit.train=48", "prune.train.batch_size=16", "prune.train.epochs=2",
                    "prune.train.max_steps=5", "prune.train.save_every_steps=2", "prune.train.log_every_steps=1"])
    task = task_for(cfg)
    features = task.featurize(task.load("train"), training=True)
    state_dir = tmp_path / "dynabert_state"

    def distillation() -> WidthDistillation:
        return WidthDistillation(clone(tiny_model), clone(tiny_model), task, features, cfg.prune, [1.0, 0.6667],
                                 seed=0, run=RecordingRun(), state_dir=state_dir, settings={"case": "last step"})

    first = distillation()
    finished = first.run({"head_importance": []})
    saved = json.loads((state_dir / STATE_FILE).read_text())
    assert saved["step"] == finished["steps"] == 5  # 5 is no multiple of save_every_steps=2

    second = distillation()
    second.resume(saved)
    again = second.run(saved["ranking"])
    assert again["steps"] == 5 and len(second.losses) == 5 and again["loss_last"] == finished["loss_last"]
    a, b = first.student.state_dict(), second.student.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("dynabert")


@pytest.fixture(scope="module")
def pruned(workdir):
    from ernie_lab.compression.strategy import compress
    from ernie_lab.training import finetune

    run_stage(cfg_for(workdir), "train", finetune)
    none = run_stage(cfg_for(workdir, "strategy=none"), "compress", compress)
    dynabert = run_stage(cfg_for(workdir, "strategy=dynabert"), "compress", compress)
    return none, dynabert


def test_pruned_export_is_physically_smaller_and_matches_dygraph(workdir, pruned):
    none, dynabert = pruned
    p = dynabert["pruning"]
    assert p["heads_per_layer"] == [3, 3] and p["ffn_per_layer"] == [85, 85] and p["head_size"] == 16
    assert p["full_heads_per_layer"] == [4, 4] and p["full_ffn_per_layer"] == [128, 128]
    assert dynabert["parameters"] == p["pruned_parameters"] < p["full_parameters"] == none["parameters"]
    # per layer: 1 head of q/k/v/out (4 * 64*16 + 3*16) and 43 neurons (2 * 64*43 + 43)
    assert p["full_parameters"] - p["pruned_parameters"] == 2 * (4 * 64 * 16 + 3 * 16 + 2 * 64 * 43 + 43)
    assert dynabert["file_size_bytes"] < none["file_size_bytes"]
    assert dynabert["export_check"]["max_abs_diff"] < 1e-4
    assert set(p["heldout_scores"]) == {"teacher", "w1.00", "w0.75", "w0.67"}
    directory = artifacts.export_dir(cfg_for(workdir, "strategy=dynabert"), "dynabert")
    assert directory.name == "dynabert-w0.67"
    assert artifacts.read_manifest(directory, "compress")["pruning"]["width_mult"] == pytest.approx(0.6667)


def test_distillation_loss_falls(workdir, pruned):
    import json

    state = json.loads((artifacts.width_adaptive_dir(cfg_for(workdir)) / "dynabert_state.json").read_text())
    training = state["training"]
    assert training["steps"] == 30
    assert training["loss_last"] < training["loss_first"], training


def test_pruned_ptq_reuses_the_width_adaptive_model_and_infer_runs_both(workdir, pruned):
    from ernie_lab.compression.strategy import compress
    from ernie_lab.inference.benchmark import infer
    from ernie_lab.tracking import find_runs

    state_file = artifacts.width_adaptive_dir(cfg_for(workdir)) / "dynabert_state.json"
    stamp = state_file.stat().st_mtime_ns
    quantized = run_stage(cfg_for(workdir, "strategy=dynabert_ptq"), "compress", compress)
    assert state_file.stat().st_mtime_ns == stamp  # no second distillation
    assert quantized["weights"] == "int8" and quantized["pruning"]["heads_per_layer"] == [3, 3]

    fp32 = run_stage(cfg_for(workdir, "strategy=dynabert", "precision=fp32"), "infer", infer)
    int8 = run_stage(cfg_for(workdir, "strategy=dynabert", "precision=int8"), "infer", infer)
    assert fp32["strategy"] == "dynabert-w0.67" and int8["strategy"] == "dynabert_ptq-w0.67"
    assert fp32["perf/qps"] > 0 and 0 <= int8["eval/accuracy"] <= 100
    runs = find_runs(cfg_for(workdir).tracking, "tags.stage = 'infer'")
    assert {r.data.tags["export_strategy"] for r in runs} == {"dynabert-w0.67", "dynabert_ptq-w0.67"}
    assert {r.data.tags["width_mult"] for r in runs} == {"0.67"}


def test_another_width_is_cut_from_the_same_model(workdir, pruned):
    from ernie_lab.compression.strategy import compress

    wider = run_stage(cfg_for(workdir, "strategy=dynabert", "prune.width_mult=0.75"), "compress", compress)
    assert wider["pruning"]["heads_per_layer"] == [3, 3] and wider["pruning"]["ffn_per_layer"] == [96, 96]
    assert artifacts.export_dir(cfg_for(workdir, "strategy=dynabert", "prune.width_mult=0.75"), "dynabert").is_dir()
    assert artifacts.export_dir(cfg_for(workdir, "strategy=dynabert"), "dynabert").is_dir()  # 0.67 still there
