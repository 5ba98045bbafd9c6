"""Every op kind against torch: the plaintext plan to float precision, the encrypted executor (two parties and a
dealer in-process) within the documented tolerance, on small models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import bridge
import mpc
from bridge.ops.activations import ERROR_BOUNDS
from bridge.plaintext import measure_ranges, run_plaintext
from bridge.secure import EncryptedModel
from bridge.sizing import comparison_bits_for, comparison_bound, default_act_bits
from bridge.trace import convert
from mpc.errors import UnsupportedModelError

from .bridge_models import randomize_zero_heads, unet

REL_TOL = 1e-2  # of the largest logit (docs/inference.md)


def _program(ctx, plan, weights, x, options):
    model = EncryptedModel(ctx, plan, weights if ctx.rank == 1 else None, **options)
    return model.predict(model.share_input(x if ctx.rank == 0 else None), to=0)


def run_both(model: nn.Module, x: torch.Tensor, *, act_bits: int | None = None):
    """(encrypted, plaintext plan, torch) outputs and the conversion; the comparison domain sized from this batch."""
    model = model.eval()
    converted = convert(model, tuple(x.shape[1:]))
    x_np = x.numpy().astype(np.float64)
    act = act_bits or default_act_bits(converted.plan)
    ranges = measure_ranges(converted.plan, converted.weights, x_np)
    bound = comparison_bound(converted.plan, ranges)
    bits = max(comparison_bits_for(act), comparison_bits_for(act, 2 * bound))
    reach = {name: 2 * value for name, value in ranges.items()}  # the owner's ring check, as infer_local does
    enc, _ = mpc.run_local(_program, parties=2, args=(converted.plan, converted.weights, x_np,
                                                      {"act_bits": act, "comparison_bits": bits,
                                                       "activation_bound": reach}))
    plain = run_plaintext(converted.plan, converted.weights, x_np)
    with torch.no_grad():
        ref = model(x).double().numpy()
    return enc, plain, ref, converted


def check(model: nn.Module, x: torch.Tensor, **kw):
    enc, plain, ref, converted = run_both(model, x, **kw)
    assert enc.shape == ref.shape == plain.shape
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(plain, ref, rtol=0, atol=1e-5 * scale)
    err = float(np.abs(enc - ref).max())
    assert err <= REL_TOL * float(np.abs(ref).max()), f"error {err} against logits up to {np.abs(ref).max()}"
    return converted, enc, ref


def _batch(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- approximations: documented bounds over a stated range ----------------------------------------------
_ACTIVATIONS = {
    "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "silu": nn.SiLU(), "hardsigmoid": nn.Hardsigmoid(),
    "hardswish": nn.Hardswish(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
    "leaky_relu": nn.LeakyReLU(0.1),
}


class _NotFinalSoftmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, -1) * 1.0  # a softmax that is not the last op runs encrypted


@pytest.mark.parametrize("name", sorted(set(ERROR_BOUNDS) & set(_ACTIVATIONS) | {"softmax"}))
def test_approximation_within_its_documented_bound(name):
    grid = np.concatenate([np.linspace(-20, 20, 4001), [-100.0, -50.0, 50.0, 100.0]])
    if name == "softmax":
        model, x = _NotFinalSoftmax(), torch.from_numpy(grid[:4000].reshape(1, 8, 500))
    else:
        model, x = nn.Sequential(_ACTIVATIONS[name]), torch.from_numpy(grid.reshape(1, -1))
    enc, plain, ref, converted = run_both(model, x, act_bits=16)
    a, b = ERROR_BOUNDS[name]
    xs = np.abs(x.numpy()) if name != "softmax" else 0.0
    assert np.all(np.abs(enc - ref) <= a + b * xs), f"max error {np.abs(enc - ref).max():.2e}"
    np.testing.assert_allclose(plain, ref, atol=1e-12)


@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_activation_in_a_network(name):
    torch.manual_seed(0)
    check(nn.Sequential(nn.Linear(6, 12), _ACTIVATIONS[name], nn.Linear(12, 4)), _batch(3, 6))


def test_functional_and_method_forms_of_activations():
    class Forms(nn.Module):
        def forward(self, x):
            return F.silu(x) + torch.sigmoid(x) + x.tanh() + F.hardswish(x) + F.gelu(x, approximate="tanh") \
                + F.hardsigmoid(x) + x.sigmoid()

    converted, _, _ = check(Forms(), _batch(2, 10))
    counts = converted.plan.counts()
    assert counts["sigmoid"] == 2 and counts["silu"] == counts["tanh"] == counts["gelu"] == 1


# -- element-wise products -------------------------------------------------------------------------------------
class Gated(nn.Module):
    """Squeeze-and-excitation (torchvision's), a GLU-style gate and a product of two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se = torchvision.ops.SqueezeExcitation(8, 4)
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.se(F.relu(self.conv(x)))
        y = self.a(y) * torch.sigmoid(self.b(y))
        y = y * y.mean((2, 3), keepdim=True)
        return self.fc(y.mean((2, 3)))


def test_gating_and_squeeze_excitation():
    torch.manual_seed(0)
    converted, _, _ = check(Gated(), _batch(2, 3, 8, 8))
    assert converted.plan.counts()["mul"] == 3


# -- pooling with ceil_mode ------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", [
    nn.MaxPool2d(3, 2, ceil_mode=True), nn.MaxPool2d(2, 2, padding=1, ceil_mode=True),
    nn.MaxPool2d(3, 1, dilation=2), nn.AvgPool2d(3, 2, ceil_mode=True, count_include_pad=False),
    nn.AvgPool2d(3, 2, padding=1, ceil_mode=True), nn.AvgPool2d(2, ceil_mode=True, divisor_override=3),
    nn.AdaptiveMaxPool2d((3, 2)),
], ids=lambda p: repr(p))
def test_pooling(pool):
    check(nn.Sequential(pool, nn.Flatten()), _batch(2, 2, 9, 8))


def test_max_pool_of_distant_values_sizes_for_the_difference():
    """A max over values ±R compares a difference of 2R: the domain is sized for it, and the max is exact."""
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0], x[0, 0, 1, 1] = 3000.0, -3000.0
    converted = convert(nn.Sequential(nn.MaxPool2d(2), nn.Flatten()).eval(), (1, 2, 2))
    ranges = measure_ranges(converted.plan, converted.weights, x.numpy())
    assert comparison_bound(converted.plan, ranges) == 6000.0
    enc, _, ref, _ = run_both(nn.Sequential(nn.MaxPool2d(2), nn.Flatten()), x)
    assert enc[0, 0] == ref[0, 0] == 3000.0


# -- data movement -------------------------------------------------------------------------------------------
class Movement(nn.Module):
    """Channel shuffle (ShuffleNet), chunk, split, permute, transpose, expand, indexing, flatten, stack, pad, roll."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(155, 6)

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.size()
        y = torch.transpose(y.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, -1, h, w)
        a, b = y.chunk(2, dim=1)
        p, q = torch.split(b, [1, 3], dim=1)
        z = torch.cat([a[:, :, 1:, ::2], p.expand(-1, 4, -1, -1)[..., 1:, ::2]], dim=1)  # (n, 8, 3, 2)
        z = z.permute(0, 2, 3, 1).flatten(1, 2)  # (n, 6, 8)
        z = torch.stack([z, z[:, :, None, 0].squeeze(2).unsqueeze(-1).expand_as(z)], dim=1)  # (n, 2, 6, 8)
        z = torch.roll(F.pad(z, (1, 2, 0, 1), value=0.5), shifts=(2, -1), dims=(2, 3))  # (n, 2, 7, 11)
        s = q.sum(dim=(2, 3)) + q.narrow(1, 0, 2).select(1, 1).mean((1, 2)).unsqueeze(1)  # (n, 3)
        return self.fc(torch.cat([z.flatten(1)[:, :-2] * 0.5, -s[:, :1] / 4.0, 1.0 - s[:, 1:]], dim=1))


def test_data_movement_ops():
    torch.manual_seed(0)
    converted, _, _ = check(Movement(), _batch(2, 4, 4, 4))
    counts = converted.plan.counts()
    assert {"permute", "index", "expand", "pad", "roll", "sum", "cat", "reshape"} <= set(counts)


# -- normalisation ---------------------------------------------------------------------------------------------
class Norms(nn.Module):
    """GroupNorm, LayerNorm over channels (ConvNeXt style, channels last), InstanceNorm, LayerNorm over 2 dims."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.ln2 = nn.LayerNorm([6, 6], elementwise_affine=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.gn(self.conv(x))
        y = self.ln(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.ln2(self.inorm(y) * 3.0)
        return self.fc(y.mean((2, 3)) + F.layer_norm(y[:, :, 0, 0], (8,)))


def test_normalisations():
    torch.manual_seed(0)
    model = Norms()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    converted, _, _ = check(model, _batch(2, 3, 6, 6))
    assert converted.plan.counts()["layer_norm"] == 5


@pytest.mark.parametrize("std", [0.01, 30.0])
def test_layer_norm_of_rows_with_a_small_or_a_large_spread(std):
    """Rows of a transformer's residual stream can have a variance of 1e-4 or of a thousand: both within the
    tolerance (the variance keeps 8 extra bits; the row sum drops log2(n) bits before its product with 1/n)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(96), nn.Flatten(), nn.Linear(4 * 96, 3))
    x = _batch(2, 4, 96) * std + 0.5 * std
    converted, enc, ref = check(model, x)
    assert converted.plan.counts()["layer_norm"] == 1


def test_layer_norm_beyond_the_ring_is_refused_naming_the_layer():
    """Rows too spread for the variance's fixed point: refused before anything runs, never a wrong result."""
    from bridge.errors import RingOverflowError

    model = nn.Sequential(nn.LayerNorm(96), nn.Flatten(), nn.Linear(4 * 96, 3)).eval()
    with pytest.raises(RingOverflowError, match=r"\(layer_norm .*can reach 2\^6\d"):
        bridge.infer_local(model, _batch(1, 4, 96) * 300.0)


# -- attention -------------------------------------------------------------------------------------------------
def test_vision_transformer_block():
    """torchvision's VisionTransformer: patch embedding, class token, position embedding, MHA, LayerNorm, GELU."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8,
                                                mlp_dim=16, num_classes=3)
    converted, _, _ = check(randomize_zero_heads(vit), _batch(2, 3, 8, 8))
    counts = converted.plan.counts()
    assert counts["matmul"] == 4 and counts["softmax"] == 2 and counts["param"] == 1 and counts["bias"] == 1
    # LayerNorm weights and biases fold into the next projection; the last LayerNorm precedes x[:, 0]
    assert counts["layer_norm"] == 5 and counts["affine"] == 1


class SDPA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):  # (N, L, 8)
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.fc(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8).mean(1))


def test_scaled_dot_product_attention():
    torch.manual_seed(0)
    check(SDPA(), _batch(2, 5, 8))


class SwinBlocks(nn.Module):
    """Two torchvision Swin blocks (plain and shifted windows) on a map that needs padding to whole windows."""

    def __init__(self, version: int = 1) -> None:
        super().__init__()
        swin = torchvision.models.swin_transformer
        block = swin.SwinTransformerBlock if version == 1 else swin.SwinTransformerBlockV2
        self.a = block(8, 2, [4, 4], [0, 0], stochastic_depth_prob=0.0)
        self.b = block(8, 2, [4, 4], [2, 2], stochastic_depth_prob=0.0)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):  # (N, 6, 6, 8)
        return self.fc(self.b(self.a(x)).mean((1, 2)))


@pytest.mark.parametrize("version", [1, 2])
def test_swin_window_attention_with_shift_and_padding(version):
    torch.manual_seed(0)
    converted, _, _ = check(SwinBlocks(version), _batch(2, 6, 6, 8))
    counts = converted.plan.counts()
    assert counts["roll"] == 2 and counts["add_const"] >= 1 and counts["bias"] == 2
    assert counts.get("l2_normalize", 0) == (4 if version == 2 else 0)  # cosine attention: q and k, two blocks


# -- resampling and transposed convolutions -------------------------------------------------------------------
@pytest.mark.parametrize("resample", [
    nn.Upsample(scale_factor=2), nn.Upsample(scale_factor=2, mode="bilinear"),
    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), nn.Upsample(size=(7, 5), mode="bilinear"),
    nn.Upsample(size=(7, 5), mode="bilinear", align_corners=True), nn.Upsample(scale_factor=1.5),
    nn.Upsample(scale_factor=1.5, mode="bilinear"), nn.Upsample(size=(9, 4), mode="nearest-exact"),
    nn.UpsamplingBilinear2d(scale_factor=3),
], ids=lambda m: repr(m))
def test_resampling(resample):
    check(nn.Sequential(nn.Conv2d(2, 3, 1), resample, nn.Flatten()), _batch(2, 2, 4, 3))


def test_interpolate_function():
    class Interp(nn.Module):
        def forward(self, x):
            a = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            b = F.interpolate(x, size=(8, 6), mode="nearest")
            return (a + b).flatten(1)

    check(Interp(), _batch(2, 2, 4, 3))


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 2, "stride": 2}, {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1, "groups": 2, "dilation": 2}, {"kernel_size": 4, "stride": 1},
], ids=str)
def test_conv_transpose2d(kwargs):
    torch.manual_seed(0)
    converted, _, _ = check(nn.Sequential(nn.ConvTranspose2d(4, 6, **kwargs), nn.Flatten()), _batch(2, 4, 5, 4))
    assert converted.plan.counts() == {"conv_transpose2d": 1, "reshape": 1}


def test_conv_transpose2d_with_output_size():
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)

        def forward(self, x):
            return self.up(x, output_size=[10, 8]).flatten(1)

    torch.manual_seed(0)
    check(Up(), _batch(2, 3, 5, 4))


def test_dropout_and_stochastic_depth_vanish_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), torchvision.ops.StochasticDepth(0.5, "row"),
                          nn.Linear(4, 2))
    converted, _, _ = check(model, _batch(3, 4))
    assert converted.plan.counts() == {"linear": 2}


# -- segmentation ----------------------------------------------------------------------------------------------
def test_unet_per_pixel_logits_encrypted():
    model = unet(in_channels=1, classes=3, width=4)
    converted, enc, ref = check(model, _batch(2, 1, 16, 16))
    assert enc.shape == (2, 3, 16, 16)
    counts = converted.plan.counts()
    assert counts["conv_transpose2d"] == 1 and counts["resize"] == 1 and counts["cat"] == 2
    # per-pixel classes agree wherever torch's top two logits are not within the tolerance of each other
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * REL_TOL * np.abs(ref).max()
    assert (enc.argmax(1) == ref.argmax(1))[clear].all()


class Einsum(nn.Module):
    """MaxViT's attention products, written as einsums."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):  # (B, G, P, 8)
        q, k, v = torch.chunk(self.qkv(x), 3, dim=-1)
        s = torch.einsum("B G I D, B G J D -> B G I J", q, k) * 0.3
        out = torch.einsum("bgij,bgjd->bgid", F.softmax(s, dim=-1), v)
        return self.fc(out.mean((1, 2)))


def test_einsum_as_a_batched_matrix_product():
    torch.manual_seed(0)
    converted, _, _ = check(Einsum(), _batch(2, 3, 4, 8))
    assert converted.plan.counts()["matmul"] == 2
    with pytest.raises(UnsupportedModelError, match="einsum .bii->bi.; to fix: write it as a matrix product"):
        convert(_Trace().eval(), (4, 4))


class _Trace(nn.Module):
    def forward(self, x):
        return torch.einsum("bii->bi", x)
