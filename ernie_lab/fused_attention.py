"""Self-attention for CPU training, the same function as paddle's `nn.MultiHeadAttention` with fewer, cheaper ops.

Profiling a 12-layer, 384-wide training step on 2 CPU cores (docs/weights-and-training.md, "Training speed") put
the largest costs outside the GEMMs on the [batch, heads, seq, seq] score tensor: adding the padding mask
(paddle's CPU broadcast add runs ~5x slower than a same-shape add) and dropout on the probabilities. Here:

- q, k and v come from one GEMM over the three weight matrices side by side (one bias add instead of three);
- the 1/sqrt(head_dim) scaling moves from the [batch, seq, hidden] queries onto the q weights and bias;
- the padding mask rides inside the score GEMM as one extra dimension: queries get a column of ones, keys the
  mask value of their position, so q.k + 1 * mask is computed by the matmul and the broadcast add disappears.

The weights stay the layer's own (q_proj, k_proj, v_proj, out_proj), so checkpoints, export and inference see the
standard layer: `enable(model)` changes how a training process computes, nothing that is saved.
"""
from __future__ import annotations

import types


# Below this many tokens the two [batch, heads, seq, head_dim + 1] copies cost more than the broadcast add they
# replace (measured at 64 tokens: slower; at 384: faster).
MASK_IN_GEMM_FROM = 128


def enable(model) -> int:
    """Route the self-attention of every `nn.MultiHeadAttention` in `model` through `forward`; the count done."""
    from paddle import nn

    count = 0
    for layer in model.sublayers():
        if isinstance(layer, nn.MultiHeadAttention) and not getattr(layer, "_fused_for_training", False):
            layer._standard_forward = layer.forward
            layer.forward = types.MethodType(forward, layer)
            layer._fused_for_training = True
            count += 1
    return count


def forward(self, query, key=None, value=None, attn_mask=None, cache=None):
    import paddle
    import paddle.nn.functional as F

    if (key is not None and key is not query) or (value is not None and value is not query) or cache is not None \
            or self.need_weights or self.q_proj.bias is None \
            or (attn_mask is not None and attn_mask.size != query.shape[0] * query.shape[1]):  # not per key
        return self._standard_forward(query, key, value, attn_mask, cache)  # cross-attention, decoding caches
    batch, seq = query.shape[0], query.shape[1]
    heads, head_dim = self.num_heads, self.head_dim
    scale = head_dim ** -0.5
    weight = paddle.concat([self.q_proj.weight * scale, self.k_proj.weight, self.v_proj.weight], axis=1)
    bias = paddle.concat([self.q_proj.bias * scale, self.k_proj.bias, self.v_proj.bias])
    # split, not indexing: the gradient of an index writes a zero-filled copy of the whole q|k|v tensor per part
    q, k, v = (part.reshape([batch, seq, heads, head_dim]).transpose([0, 2, 1, 3])
               for part in paddle.split(F.linear(query, weight, bias), 3, axis=-1))  # [batch, heads, seq, head_dim]
    mask = None if attn_mask is None else _additive(attn_mask, q.dtype)
    in_gemm = mask is not None and seq >= MASK_IN_GEMM_FROM
    if in_gemm:  # one additive value per key, as [batch, heads, seq, 1]
        q = paddle.concat([q, paddle.ones([batch, heads, seq, 1], dtype=q.dtype)], axis=-1)
        k = paddle.concat([k, mask.reshape([batch, 1, seq, 1]).expand([batch, heads, seq, 1])], axis=-1)
    scores = paddle.matmul(q, k, transpose_y=True)
    if mask is not None and not in_gemm:
        scores = scores + mask
    weights = F.softmax(scores)
    if self.dropout:
        weights = F.dropout(weights, self.dropout, training=self.training, mode="upscale_in_train")
    out = paddle.matmul(weights, v).transpose([0, 2, 1, 3]).reshape([batch, seq, heads * head_dim])
    return self.out_proj(out)


def _additive(attn_mask, dtype):
    """The mask as values added to the scores (ERNIE's [batch, 1, 1, seq] already is; a boolean one, True = attend,
    becomes 0 / -1e4 as paddle's layer reads it)."""
    import paddle

    if attn_mask.dtype == paddle.bool:
        return (1.0 - attn_mask.astype(dtype)) * -1e4
    return attn_mask.astype(dtype)
