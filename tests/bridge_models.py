"""Small torch models for the bridge tests: real torchvision architectures at small sizes, and
hand-written modules covering every supported op in module and functional form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def realistic(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode with non-trivial BatchNorm statistics (as after training), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


def resnet18(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return realistic(torchvision.models.resnet18(weights=None, num_classes=num_classes), seed)


def narrow_vgg11(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """torchvision's VGG-11 with BatchNorm at a quarter of the width and a small classifier."""
    torch.manual_seed(seed)
    cfg = [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"]
    features = torchvision.models.vgg.make_layers(cfg, batch_norm=True)
    model = torchvision.models.VGG(features, num_classes=num_classes, init_weights=True)
    model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    model.classifier = nn.Sequential(
        nn.Linear(128 * 2 * 2, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(),
        nn.Linear(64, num_classes),
    )
    return realistic(model, seed)


def narrow_alexnet(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """torchvision's AlexNet features (full width) with a small classifier after its (6, 6) pooling."""
    torch.manual_seed(seed)
    model = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 32), nn.ReLU(inplace=True), nn.Dropout(),
                                     nn.Linear(32, num_classes))
    return model.eval()


class EveryOp(nn.Module):
    """Every supported op, in module, functional and method forms, with unfoldable BatchNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)  # folded into conv
        self.dil = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.side = nn.Conv2d(8, 8, 1, stride=2)
        self.bn_cat = nn.BatchNorm2d(16)  # after a cat: stays an affine op
        self.w = nn.Parameter(torch.randn(16, 16, 3, 3) * 0.1)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.relu6 = nn.ReLU6()
        self.mp = nn.MaxPool2d(2)
        self.adapt = nn.AdaptiveAvgPool2d((3, None))
        self.fc = nn.Linear(16 * 3 * 3, 12)
        self.bn1d = nn.BatchNorm1d(12)  # folded into fc
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(12, 5)
        self.ident = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        a, b = self.dil(y), self.side(y)
        z = self.bn_cat(torch.cat([a + b, b], dim=1))
        z = F.conv2d(z, self.w, None, 1, 1)
        z = self.relu6(self.pool(z) + 0.25)
        z = torch.clamp(z, 0.0, 2.0)
        z = self.mp(z)
        z = F.avg_pool2d(z, 1)
        z = self.adapt(z)
        z = z.view(z.size(0), -1)
        z = self.drop(self.bn1d(self.fc(z)))
        z = z.relu_()
        return self.head(self.ident(F.dropout(z, 0.5, self.training)))


class Preact(nn.Module):
    """BatchNorm before a conv (not foldable), a mean over space, ReLU then max-pool (swapped)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 6, 3, padding="same")
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(self.bn(x))), 3, stride=2, padding=1)
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean([2, 3]))


class WithSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.body(x))


def randomize_zero_heads(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero-initialised linear layers (torchvision's ViT head) small random weights: outputs are not all 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
    return model


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A small U-Net for segmentation: two encoder stages, a bottleneck, one decoder stage up by ConvTranspose2d and
    one by bilinear Upsample, skip concatenations, per-pixel class logits (N, classes, H, W)."""

    def __init__(self, in_channels: int = 1, classes: int = 3, width: int = 4) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2 = _block(in_channels, w), _block(w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _block(4 * w, 2 * w)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                 nn.Conv2d(2 * w, w, 1))
        self.dec1 = _block(2 * w, w)
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def unet(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return realistic(UNet(**kwargs), seed)
