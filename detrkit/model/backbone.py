"""ResNet backbone with frozen batch norm."""
from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import misc

_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_TRAINABLE = ("layer2", "layer3", "layer4")


class FrozenBatchNorm2d(misc.FrozenBatchNorm2d):
    """torchvision's frozen batch norm (same buffers and state-dict keys), computed as one fused
    multiply-add in the input's dtype: under bf16 autocast the conv output stays bf16 instead of
    being promoted to float32 by the float32 statistics (which cost a cast before every next conv)."""

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(shift.to(x.dtype)[:, None, None], x, scale.to(x.dtype)[:, None, None])


def dilate_layer4(layer4: nn.Sequential) -> None:
    """DC5 in place, for any torchvision ResNet's layer4 (torchvision itself only dilates bottlenecks, and
    only when building): the first block loses its stride and keeps dilation 1, every later block's 3x3
    convolutions take dilation 2, as torchvision does for bottlenecks."""
    for conv in layer4[0].modules():
        if isinstance(conv, nn.Conv2d) and conv.stride == (2, 2):
            conv.stride = (1, 1)
    for block in list(layer4)[1:]:
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                conv.dilation, conv.padding = (2, 2), (2, 2)


class ResNetBody(nn.Module):
    """conv1 .. layer4 of a torchvision ResNet (no pooling head).

    forward(x [B,3,H,W]) -> C5 [B,C,H/32,W/32]; stages(x) -> [C2, C3, C4, C5], the outputs of layer1..4
    (strides 4, 8, 16, 32), for heads that need finer maps (e.g. masks)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)[-1]

    def stages(self, x: Tensor) -> list[Tensor]:
        if x.device.type == "cpu":  # oneDNN's own layout: ~1.5x faster convolutions than NCHW in float32
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out


class Backbone(nn.Module):
    """ResNet with every BatchNorm frozen; conv1 and layer1 never train (the paper, for an ImageNet
    backbone). norm="batch" instead trains batch norm and every layer: the choice for a backbone
    trained from scratch, whose random stem and unnormalised activations would otherwise stay fixed.

    forward(images [B,3,H,W], mask [B,H,W]) -> (features [B,C,H/32,W/32] (H/16 with DC5), mask [B,h,w]).
    """

    def __init__(self, name: str = "resnet50", dilation: bool = False, train_backbone: bool = True,
                 weights: str | None = None, norm: str = "frozen"):
        super().__init__()
        if name not in _RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {_RESNETS}")
        if norm not in ("frozen", "batch"):
            raise ValueError(f"backbone norm must be 'frozen' or 'batch', got {norm!r}")
        basic = name in ("resnet18", "resnet34")
        resnet = getattr(torchvision.models, name)(
            weights=weights, norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d,
        )
        if dilation:
            dilate_layer4(resnet.layer4)
        self.body = ResNetBody(resnet)
        self.num_channels = 512 if basic else 2048
        for pname, p in self.body.named_parameters():
            trainable = norm == "batch" or pname.startswith(_TRAINABLE)
            if not train_backbone or not trainable:
                p.requires_grad_(False)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(images)
        return features, feature_mask(mask, features)


def feature_mask(mask: Tensor, features: Tensor) -> Tensor:
    """The padding mask [B,H,W] of the images at the feature map's size [B,h,w] (nearest)."""
    return F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
