"""Attention, as trace rules that emit plan ops of other kinds (linear, reshape, permute, index, matmul, softmax,
bias, add_const): no op kind of its own.

Multi-head attention (``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``):

  q, k, v = x W_q, x W_k, x W_v   one owned product when q, k and v read the same tensor;
                                  1/sqrt(d) is folded into W_q and b_q (exact, free)
  s = q k^T                       one Beaver product per layer, all heads at once
  a = softmax(s)                  approximated (mpc ``softmax``)
  o = a v                         one Beaver product
  out = o W_o                     one owned product

Swin's window attention (torchvision's ``shifted_window_attention``, V1 and V2's cosine attention) adds
padding to whole windows, a cyclic shift (``roll``), the window partition
(reshapes and permutes, the batch kept first), the model's relative position
bias (a ``bias`` with the owner's values) and the public shift mask (0 or -100,
an ``add_const``), then undoes the partition and the shift.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..registry import Refusal, TorchRule
from .arith import trace_add_const, trace_scale
from .products import trace_matmul
from .shape import trace_index, trace_pad, trace_permute, trace_reshape, trace_roll

__all__ = ["RULES"]


def _linear(t: Any, c: Any, x: str, weight: np.ndarray, bias: np.ndarray | None, tag: str) -> str:
    b = np.zeros(weight.shape[0]) if bias is None else bias
    return t.sub(c, tag, "linear", [x], {}, {"weight": weight, "bias": b})


def _folded_qkv(weight: np.ndarray, bias: np.ndarray | None, embed: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The joint q/k/v projection with the softmax's 1/sqrt(d) folded into the q rows."""
    w = np.array(weight, dtype=np.float64, copy=True)
    b = np.zeros(w.shape[0]) if bias is None else np.array(bias, dtype=np.float64, copy=True)
    w[:embed] /= np.sqrt(head_dim)
    b[:embed] /= np.sqrt(head_dim)
    return w, b


def _transposed(t: Any, c: Any, k: str, tag: str = "kT") -> str:
    ndim = len(t.shape(k)) + 1
    return trace_permute(t, c, k, tuple(range(ndim - 2)) + (ndim - 1, ndim - 2), tag)


def _heads(t: Any, c: Any, joint: str, length_axis_shape: tuple[int, ...], heads: int, head_dim: int) -> list[str]:
    """(N, *lead, L, 3E) -> q, k, v with heads split, each (N, *lead, h, L, d)."""
    lead = length_axis_shape[:-1]
    length = length_axis_shape[-1]
    n = len(lead)
    split = trace_reshape(t, c, joint, "split", lead + (length, 3, heads, head_dim))
    # (N, *lead, L, 3, h, d) -> (N, 3, *lead, h, L, d)
    perm = (0, n + 2) + tuple(range(1, n + 1)) + (n + 3, n + 1, n + 4)
    moved = trace_permute(t, c, split, perm, "heads")
    return [trace_index(t, c, moved, [["i", j]], name) for j, name in enumerate(("q", "k", "v"))]


def _attend(t: Any, c: Any, q: str, kt: str, v: str, mask: Any = None) -> str:
    scores = trace_matmul(t, c, q, kt, "scores")
    if mask is not None:
        scores = mask(scores)
    weights = t.sub(c, "weights", "softmax", [scores], {"axis": len(t.shape(scores))})
    return trace_matmul(t, c, weights, v, "mixed")


def _merge_heads(t: Any, c: Any, mixed: str, lead: tuple[int, ...], length: int, embed: int) -> str:
    """(N, *lead, h, L, d) -> (N, *lead, L, E)."""
    n = len(lead)
    perm = (0,) + tuple(range(1, n + 1)) + (n + 2, n + 1, n + 3)
    moved = trace_permute(t, c, mixed, perm, "merge")
    return trace_reshape(t, c, moved, "merged", lead + (length, embed))


# -- nn.MultiheadAttention ---------------------------------------------------------------------------
def _mha_rule(t: Any, c: Any) -> None:
    m = c.module
    query, key, value = c.arg(0, "query"), c.arg(1, "key"), c.arg(2, "value")
    for name in ("key_padding_mask", "attn_mask"):
        if c.kwargs.get(name) is not None:
            raise Refusal(f"multi-head attention with {name}", "use attention without masks")
    if t.static(c.kwargs.get("is_causal", False)):
        raise Refusal("causal multi-head attention", "use attention without masks")
    if not m.batch_first:
        raise Refusal("multi-head attention with batch_first=False (the sequence comes first)",
                      "construct nn.MultiheadAttention(..., batch_first=True)")
    if m.bias_k is not None or m.add_zero_attn:
        raise Refusal("multi-head attention with add_bias_kv or add_zero_attn")
    if m.dropout and m.training:
        raise Refusal("attention dropout in training mode", "call model.eval() first")
    embed, heads = m.embed_dim, m.num_heads
    head_dim = embed // heads
    length = t.shape(query)[-2]
    lead = t.shape(query)[:-2]
    in_bias = t.array(m.in_proj_bias)
    if m._qkv_same_embed_dim and query is key and key is value:
        w, b = _folded_qkv(t.array(m.in_proj_weight), in_bias, embed, head_dim)
        joint = _linear(t, c, t.tensor(query), w, b, "qkv")
        q, k, v = _heads(t, c, joint, lead + (length,), heads, head_dim)
        kt = _transposed(t, c, k)
    else:
        if m._qkv_same_embed_dim:
            w = t.array(m.in_proj_weight)
            ws = [w[:embed], w[embed:2 * embed], w[2 * embed:]]
        else:
            ws = [t.array(m.q_proj_weight), t.array(m.k_proj_weight), t.array(m.v_proj_weight)]
        bs = [None] * 3 if in_bias is None else [in_bias[:embed], in_bias[embed:2 * embed], in_bias[2 * embed:]]
        ws[0] = ws[0] / np.sqrt(head_dim)
        bs[0] = None if bs[0] is None else bs[0] / np.sqrt(head_dim)
        projected = [_linear(t, c, t.tensor(src), w_, b_, tag)
                     for src, w_, b_, tag in zip((query, key, value), ws, bs, ("q_in", "k_in", "v_in"))]
        split = []
        for name, proj in zip(("q", "k", "v"), projected):
            shape = t.shape(proj)
            r = trace_reshape(t, c, proj, f"{name}_split", shape[:-1] + (heads, head_dim))
            n = len(shape[:-2])
            perm = (0,) + tuple(range(1, n + 1)) + (n + 2, n + 1, n + 3)
            split.append(trace_permute(t, c, r, perm, f"{name}_heads"))
        q, k, v = split
        kt = _transposed(t, c, k)
    mixed = _attend(t, c, q, kt, v)
    merged = _merge_heads(t, c, mixed, lead, length, embed)
    out = _linear(t, c, merged, t.array(m.out_proj.weight), t.array(m.out_proj.bias), "out")
    averaged = None
    if t.static(c.kwargs.get("need_weights", True)):
        weights = f"{c.node.name}__weights"
        average = bool(t.static(c.kwargs.get("average_attn_weights", True)))
        axis = len(t.shape(weights)) - 2
        averaged = t.sub(c, "weights_mean", "mean", [weights], {"axes": (axis,), "keepdim": False}) if average \
            else weights
    t.outputs(c, [out, averaged])


def _sdpa_rule(t: Any, c: Any) -> None:
    q, k, v = c.arg(0, "query"), c.arg(1, "key"), c.arg(2, "value")
    if c.arg(3, "attn_mask", None) is not None or t.static(c.arg(5, "is_causal", False)):
        raise Refusal("scaled_dot_product_attention with a mask", "use attention without masks")
    if t.static(c.arg(4, "dropout_p", 0.0)):
        raise Refusal("attention dropout", "pass dropout_p=0.0 in eval mode")
    if t.static(c.kwargs.get("enable_gqa", False)):
        raise Refusal("grouped-query attention")
    scale = t.static(c.kwargs.get("scale", None))
    head_dim = t.shape(q)[-1]
    scale = 1.0 / np.sqrt(head_dim) if scale is None else float(scale)
    kt = _transposed(t, c, k)
    scaled = trace_scale(t, c, q, scale, "q_scaled")
    t.alias(c, _attend(t, c, scaled, kt, t.tensor(v)))


# -- Swin ------------------------------------------------------------------------------------------------
def _shift_mask(pad_h: int, pad_w: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """torchvision's attention mask for shifted windows: (windows, 1, L, L) of 0 and -100."""
    mask = np.zeros((pad_h, pad_w))
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    mask = mask.reshape(pad_h // window[0], window[0], pad_w // window[1], window[1]).transpose(0, 2, 1, 3)
    mask = mask.reshape(-1, window[0] * window[1])
    diff = mask[:, None, :] - mask[:, :, None]
    return np.where(diff != 0, -100.0, 0.0)[:, None]


def _swin_rule(t: Any, c: Any) -> None:
    x = c.arg(0, "input")
    logit_scale = t.constant(c.arg(11, "logit_scale", None))
    if c.arg(11, "logit_scale", None) is not None and logit_scale is None:
        raise Refusal("cosine attention whose logit scale is computed from the input")
    if t.static(c.arg(12, "training", True)) and (t.static(c.arg(7, "attention_dropout", 0.0))
                                                  or t.static(c.arg(8, "dropout", 0.0))):
        raise Refusal("window attention with dropout in training mode", "call model.eval() first")
    qkv_w, proj_w = t.constant(c.arg(1, "qkv_weight")), t.constant(c.arg(2, "proj_weight"))
    rel_bias = t.constant(c.arg(3, "relative_position_bias"))
    window = tuple(int(v) for v in t.static(c.arg(4, "window_size")))
    heads = int(t.static(c.arg(5, "num_heads")))
    shift = [int(v) for v in t.static(c.arg(6, "shift_size"))]
    qkv_b, proj_b = t.constant(c.arg(9, "qkv_bias", None)), t.constant(c.arg(10, "proj_bias", None))
    if qkv_w is None or proj_w is None or rel_bias is None:
        raise Refusal("window attention whose weights are computed from the input")
    h, w, ch = t.shape(x)
    pad_b, pad_r = (window[0] - h % window[0]) % window[0], (window[1] - w % window[1]) % window[1]
    y = trace_pad(t, c, x, [0, 0, 0, pad_r, 0, pad_b], 0.0, "pad")
    ph, pw = h + pad_b, w + pad_r
    if window[0] >= ph:
        shift[0] = 0
    if window[1] >= pw:
        shift[1] = 0
    shifted = sum(shift) > 0
    if shifted:
        y = trace_roll(t, c, y, (-shift[0], -shift[1]), (1, 2), "shift")
    nh, nw, length = ph // window[0], pw // window[1], window[0] * window[1]
    y = trace_reshape(t, c, y, "grid", (nh, window[0], nw, window[1], ch))
    y = trace_permute(t, c, y, (0, 1, 3, 2, 4, 5), "windowed")
    y = trace_reshape(t, c, y, "windows", (nh * nw, length, ch))
    head_dim = ch // heads
    if logit_scale is None:  # Swin V1: scaled dot products, 1/sqrt(d) folded into the queries
        wq, bq = _folded_qkv(qkv_w, qkv_b, ch, head_dim)
        q, k, v = _heads(t, c, _linear(t, c, y, wq, bq, "qkv"), (nh * nw, length), heads, head_dim)
    else:  # Swin V2: cosine attention (no key bias), scaled per head by exp(min(logit_scale, log 100))
        bq = None if qkv_b is None else np.concatenate([qkv_b[:ch], np.zeros(ch), qkv_b[2 * ch:]])
        q, k, v = _heads(t, c, _linear(t, c, y, qkv_w, bq, "qkv"), (nh * nw, length), heads, head_dim)
        q = t.sub(c, "q_unit", "l2_normalize", [q], {"axis": len(t.shape(q)), "eps": 1e-12})
        k = t.sub(c, "k_unit", "l2_normalize", [k], {"axis": len(t.shape(k)), "eps": 1e-12})
    kt = _transposed(t, c, k)

    def masked(scores: str) -> str:
        if logit_scale is not None:
            scale = np.exp(np.minimum(logit_scale, np.log(100.0))).reshape((heads, 1, 1))
            scores = t.sub(c, "logit_scale", "affine", [scores], {}, {"scale": scale, "shift": np.zeros_like(scale)})
        out = t.sub(c, "rel_bias", "bias", [scores], {}, {"value": rel_bias.reshape((1, heads, length, length))})
        if shifted:
            out = trace_add_const(t, c, out, _shift_mask(ph, pw, window, (shift[0], shift[1])), "shift_mask")
        return out

    mixed = _attend(t, c, q, kt, v, masked)
    merged = _merge_heads(t, c, mixed, (nh * nw,), length, ch)
    y = _linear(t, c, merged, proj_w, proj_b, "proj")
    y = trace_reshape(t, c, y, "grid_back", (nh, nw, window[0], window[1], ch))
    y = trace_permute(t, c, y, (0, 1, 3, 2, 4, 5), "unwindowed")
    y = trace_reshape(t, c, y, "joined", (ph, pw, ch))
    if shifted:
        y = trace_roll(t, c, y, (shift[0], shift[1]), (1, 2), "unshift")
    if pad_b or pad_r:
        y = trace_index(t, c, y, [["s", 0, h, None], ["s", 0, w, None]], "crop")
    t.alias(c, y)


def _patch_merging_pad_rule(t: Any, c: Any) -> None:
    """Swin's patch merging: pad H and W to even sizes, then the four 2x2-strided grids side by side."""
    x = c.arg(0, "x")
    h, w, _ = t.shape(x)[-3:]
    y = trace_pad(t, c, x, [0, 0, 0, w % 2, 0, h % 2], 0.0, "pad")
    lead = [["s", None, None, None]] * (len(t.shape(x)) - 3)
    grids = [trace_index(t, c, y, lead + [["s", a, None, 2], ["s", b, None, 2]], f"grid{k}")
             for k, (a, b) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1)))]
    t.emit(c, "cat", grids, {"axis": len(t.shape(x))})


RULES = (
    TorchRule(("nn.MultiheadAttention",), _mha_rule),
    TorchRule(("F.scaled_dot_product_attention",), _sdpa_rule),
    TorchRule(("torchvision.models.swin_transformer.shifted_window_attention",), _swin_rule),
    TorchRule(("torchvision.models.swin_transformer._patch_merging_pad",), _patch_merging_pad_rule),
)
