"""Training's fused self-attention computes what paddle's layer computes: same outputs, same gradients, with the
padding mask added by broadcast (short sequences) or inside the score GEMM (long ones)."""
from __future__ import annotations

import numpy as np
import pytest

from ernie_lab import fused_attention
from tests.conftest import make_cfg


def twin_models(tokenizer):
    import paddle

    from ernie_lab.modeling import build_model
    from ernie_lab.tasks import build_task

    cfg = make_cfg(["model=tiny", "task=msra_ner", "model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0"])
    task = build_task(cfg.task, tokenizer)
    paddle.seed(3)
    standard = build_model(cfg.model, task.model_class(), task.head_config())
    fused = build_model(cfg.model, task.model_class(), task.head_config())
    fused.set_state_dict(standard.state_dict())
    assert fused_attention.enable(fused) == cfg.model.num_hidden_layers
    assert fused_attention.enable(fused) == 0  # once only
    return standard, fused


@pytest.mark.parametrize("mask_in_gemm_from", [0, 10_000], ids=["mask-in-gemm", "mask-added"])
def test_fused_attention_matches_paddles_layer_in_outputs_and_gradients(tokenizer, monkeypatch, mask_in_gemm_from):
    import paddle

    monkeypatch.setattr(fused_attention, "MASK_IN_GEMM_FROM", mask_in_gemm_from)
    standard, fused = twin_models(tokenizer)
    ids = np.random.default_rng(0).integers(5, 3000, size=(4, 20))
    ids[1, 9:] = tokenizer.pad_token_id  # padded rows: the mask matters
    ids[3, 4:] = tokenizer.pad_token_id
    ids = paddle.to_tensor(ids)
    labels = paddle.to_tensor(np.random.default_rng(1).integers(0, 7, size=(4, 20)))
    grads = []
    for model in (standard, fused):
        model.train()
        logits = model(ids, token_type_ids=paddle.zeros_like(ids))
        loss = paddle.nn.functional.cross_entropy(logits, labels.unsqueeze(-1))
        loss.backward()
        grads.append(({n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}, logits.numpy()))
    (g_std, out_std), (g_fused, out_fused) = grads
    np.testing.assert_allclose(out_fused, out_std, rtol=1e-5, atol=1e-5)
    assert g_std.keys() == g_fused.keys() and len(g_std) > 20
    for name in g_std:
        if name.endswith("k_proj.bias"):  # mathematically zero (softmax ignores a per-row shift): only noise
            assert np.abs(g_fused[name]).max() < 1e-6
            continue
        np.testing.assert_allclose(g_fused[name], g_std[name], rtol=1e-3, atol=1e-6, err_msg=name)
    # nothing that is saved changes: same parameters, same names
    assert standard.state_dict().keys() == fused.state_dict().keys()
