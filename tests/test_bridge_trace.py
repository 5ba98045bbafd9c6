"""Conversion of torch models to plans, checked by the plaintext executor against torch itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from bridge.plaintext import run_plaintext
from bridge.trace import convert
from mpc.errors import ConfigError, UnsupportedModelError

from .bridge_models import (EveryOp, Preact, WithSoftmax, narrow_alexnet, narrow_vgg11, randomize_zero_heads, realistic,
                            resnet18, unet)


def _check_plaintext(model: nn.Module, shape: tuple[int, ...], batch: int = 2, rtol: float = 1e-5):
    converted = convert(model, shape)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).double().numpy()
    out = run_plaintext(converted.plan, converted.weights, x.numpy(), final_softmax=True)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=rtol * max(1.0, np.abs(ref).max()))
    assert len(converted.plan.digest()) == 64  # every record is plain data
    return converted


@pytest.mark.parametrize(
    "name, size",
    [
        ("squeezenet1_0", 64),
        ("squeezenet1_1", 64),
        ("googlenet", 64),
        ("mobilenet_v3_small", 32),
        ("efficientnet_b0", 32),
        ("regnet_y_400mf", 32),
        ("shufflenet_v2_x0_5", 32),
        ("convnext_tiny", 32),
        ("vit_b_16", 32),
        ("swin_t", 32),
        ("swin_v2_t", 32),
        ("maxvit_t", 224),
        ("resnet18", 64),
        ("resnet50", 32),
        ("alexnet", 64),
        ("mobilenet_v2", 32),
        pytest.param("resnet34", 32, marks=pytest.mark.slow),
        pytest.param("vgg11_bn", 32, marks=pytest.mark.slow),  # 133 M weights: slow to copy, not to trace
        pytest.param("vgg16", 32, marks=pytest.mark.slow),
    ],
)
def test_torchvision_models_convert_and_match(name, size):
    torch.manual_seed(0)
    extra = {"image_size": size} if name.startswith("vit") else \
        {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = randomize_zero_heads(realistic(torchvision.models.get_model(name, weights=None, num_classes=7, **extra)))
    converted = _check_plaintext(model, (3, size, size), rtol=1e-4)
    assert converted.plan.output_shape == (7,)


def test_resnet18_folds_every_batchnorm_and_pools_before_relu():
    plan = convert(resnet18(), (3, 64, 64)).plan
    kinds = [op.kind for op in plan.ops]
    counts = plan.counts()
    assert "affine" not in counts  # all 20 BatchNorms folded into their convolutions
    assert counts["conv2d"] == 20 and counts["relu"] == 17 and counts["max_pool2d"] == 1
    # the stem's ReLU now runs on the pooled map: pooling comes first
    assert kinds.index("max_pool2d") < kinds.index("relu")
    pool = next(op for op in plan.ops if op.kind == "max_pool2d")
    assert plan.ops[plan.ops.index(pool) + 1].kind == "relu"


def test_every_op_module_functional_and_method_forms():
    converted = _check_plaintext(realistic(EveryOp()), (3, 12, 12), batch=3)
    counts = converted.plan.counts()
    assert counts["affine"] == 1  # the BatchNorm after torch.cat cannot fold
    assert counts["linear"] == 2  # BatchNorm1d folded into the first one
    assert counts["conv2d"] == 4 and counts["cat"] == 1 and counts["add"] == 1 and counts["add_const"] == 1
    assert counts["clamp"] == 2 and counts["relu"] == 2


def test_unfoldable_batchnorm_mean_and_same_padding():
    converted = _check_plaintext(realistic(Preact()), (3, 10, 10))
    kinds = [op.kind for op in converted.plan.ops]
    assert kinds[0] == "affine" and "mean" in kinds
    assert kinds.index("max_pool2d") < kinds.index("relu")


def test_width_reduced_vgg_and_alexnet():
    _check_plaintext(narrow_vgg11(), (3, 32, 32))
    _check_plaintext(narrow_alexnet(), (3, 64, 64))


@pytest.mark.parametrize("output", [(1, 1), (3, 2), (7, 7), (2, 5)])
def test_adaptive_avg_pool_any_output_size(output):
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.AdaptiveAvgPool2d(output), nn.Flatten()).eval()
    _check_plaintext(model, (2, 7, 5))


@pytest.mark.parametrize("kwargs", [{"count_include_pad": True}, {"count_include_pad": False}, {"divisor_override": 3}])
def test_avg_pool_padding_divisors(kwargs):
    model = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1, **kwargs), nn.Flatten()).eval()
    _check_plaintext(model, (2, 9, 8))


def test_unet_converts_with_both_decoders_and_keeps_the_output_shape():
    converted = _check_plaintext(unet(in_channels=2, classes=4), (2, 32, 24))
    assert converted.plan.output_shape == (4, 32, 24)
    counts = converted.plan.counts()
    assert counts["conv_transpose2d"] == 1 and counts["resize"] == 1 and counts["cat"] == 2


def test_final_softmax_is_lifted_out():
    model = WithSoftmax().eval()
    converted = _check_plaintext(model, (1, 8, 8))  # final_softmax=True reproduces the probabilities
    assert converted.plan.softmax_axis == 1
    assert "softmax" not in converted.plan.counts()


def test_plan_digest_identifies_the_architecture():
    a = convert(resnet18(seed=0), (3, 32, 32)).plan
    b = convert(resnet18(seed=1), (3, 32, 32)).plan  # other weights, same architecture
    c = convert(resnet18(seed=0), (3, 64, 64)).plan
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()
    assert a.param_shapes() == b.param_shapes()


# -- what is refused, and how ----------------------------------------------------------
class _Several(nn.Module):
    """Five different blockers, each depending on the one before it."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y, _ = self.lstm(x)
        z = torch.erf(self.fc(y))
        a, _ = self.attn(z, z, z, attn_mask=torch.zeros(5, 5))
        w = a / a.sum(-1, keepdim=True)
        return torch.cumsum(w, 1)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return self.fc(out[:, -1])


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)

    def forward(self, x):
        return self.layer(x).mean(1)


class _MaskedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleList(nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(12))
        self.register_buffer("mask", torch.zeros(5, 5))

    def forward(self, x):
        for layer in self.attn:
            x = x + layer(x, x, x, attn_mask=self.mask)[0]
        return x


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


def _refusal(model: nn.Module, shape: tuple[int, ...]) -> UnsupportedModelError:
    with pytest.raises(UnsupportedModelError) as err:
        convert(model.eval(), shape)
    return err.value


def test_unsupported_module_names_path_op_and_supported_list():
    err = _refusal(nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Softplus())), (4,))
    message = str(err)
    assert "Softplus" in message and "1.0" in message and "Supported:" in message and "Conv2d" in message
    assert err.module == "1.0" and err.op == "Softplus"


def test_every_blocker_is_named_at_once_with_its_source_line():
    err = _refusal(_Several(), (5, 8))
    message = str(err)
    assert [b.what for b in err.blockers] == ["LSTM", "erf", "MultiheadAttention", "truediv", "cumsum"]
    assert "recurrent layer (LSTM)" in message and "multi-head attention with attn_mask" in message
    assert "division by an encrypted tensor" in message and "getitem" not in message
    lines = [b.line for b in err.blockers]
    assert all(line.startswith("test_bridge_trace.py:") for line in lines) and len(set(lines)) == 5
    assert all(b.fix for b in err.blockers)  # each says what to do


def test_a_recurrent_model_is_named_as_recurrent_not_getitem():
    err = _refusal(_Recurrent(), (5, 8))
    assert len(err.blockers) == 1 and err.op == "LSTM"
    assert "recurrent layer (LSTM) is not supported" in str(err) and "getitem" not in str(err)


def test_attention_is_named_as_attention():
    err = _refusal(_Encoder(), (5, 8))
    assert "attention in torch.nn.TransformerEncoderLayer" in str(err) and "MultiheadAttention" in str(err)
    err = _refusal(_MaskedAttention(), (5, 8))
    assert "multi-head attention with attn_mask" in str(err) and "and 6 more" in str(err)  # 12 places, one line


def test_same_blocker_in_many_places_is_one_line_listing_them():
    model = nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 4), nn.Softplus())
    err = _refusal(model, (4,))
    assert len(err.blockers) == 2 and str(err).count("Softplus at") == 1 and "1, 3" in str(err)


def test_untraceable_model_is_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="torch.fx cannot trace"):
        convert(_Branchy().eval(), (4,))


def test_training_mode_and_bad_shapes_are_config_errors():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="eval"):
        convert(model, (4,))
    with pytest.raises(ConfigError, match="does not run"):
        convert(model.eval(), (5,))
    with pytest.raises(ConfigError, match="input_shape"):
        convert(model.eval(), (0,))
