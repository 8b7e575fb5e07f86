"""ResNet backbone with frozen batch norm (reference section 2)."""
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


class ResNetBody(nn.Module):
    """conv1 .. layer4 of a torchvision ResNet (no pooling head); returns the C5 map."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Backbone(nn.Module):
    """ResNet with every BatchNorm frozen; conv1 and layer1 never train.

    forward(images [B,3,H,W], mask [B,H,W]) -> (features [B,C,H/32,W/32] (H/16 with DC5), mask [B,h,w]).
    """

    def __init__(self, name: str = "resnet50", dilation: bool = False, train_backbone: bool = True,
                 weights: str | None = None):
        super().__init__()
        if name not in _RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {_RESNETS}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"{name} has basic blocks, which do not support dilation (DC5)")
        resnet = getattr(torchvision.models, name)(
            weights=weights, norm_layer=FrozenBatchNorm2d,
            replace_stride_with_dilation=[False, False, dilation],
        )
        self.body = ResNetBody(resnet)
        self.num_channels = 512 if name in ("resnet18", "resnet34") else 2048
        for pname, p in self.body.named_parameters():
            if not train_backbone or not pname.startswith(_TRAINABLE):
                p.requires_grad_(False)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(images)
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, mask
