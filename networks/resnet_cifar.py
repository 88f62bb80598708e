"""The CIFAR ResNet family of He et al. 2016 (ResNet-20/32/44/56/110), as a feature extractor.

Three stages of 16/32/64 channels with n basic blocks each (depth = 6n + 2), identity shortcuts
that subsample and zero-pad channels where the shape changes ('option A', as in akamaster's
reference and the LDAM-DRW / BBN code), Kaiming-normal init. The final linear layer is left out:
the hybrid network puts its own heads on the pooled 64-d feature.

Also ResNet-8 (n = 1), the family's smallest member, as in knowledge-distillation work (e.g. CRD's resnet8): about
a third of ResNet-20's arithmetic, for quick checks of the pipeline (the test suite uses it).

Backbone parameter counts (no fc), checked in tests/test_networks.py:
    resnet8 74,640 | resnet20 269,072 | resnet32 463,504 | resnet44 657,936 | resnet56 852,368 | resnet110 1,727,312
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STAGE_WIDTHS = (16, 32, 64)


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal (fan-in, ReLU gain) weights for conv and linear layers, as akamaster does.

    Biases and BatchNorm keep PyTorch's defaults (BN: weight 1, bias 0).
    """
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class PadShortcut(nn.Module):
    """Parameter-free 'option A' shortcut: x[:, :, ::2, ::2], then zero channels on both sides.

    x: [N, C_in, H, W] -> [N, C_in + 2 * pad_channels, H / 2, W / 2].
    A module rather than a lambda so the model can be pickled and deep-copied.
    """

    def __init__(self, pad_channels: int):
        super().__init__()
        self.pad_channels = pad_channels

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"

    def forward(self, x: Tensor) -> Tensor:
        # F.pad's tuple runs from the last dim backwards: (W_left, W_right, H_top, H_bottom, C_front, C_back).
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_channels, self.pad_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: [N, in_planes, H, W] -> [N, planes, H/s, W/s]."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            # CIFAR ResNets only ever double the width while halving the resolution, so
            # planes // 4 zeros on each side take in_planes = planes / 2 to planes.
            self.shortcut: nn.Module = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # In place where autograd allows it (as torchvision's ResNet): batch norm's backward needs its input, not its
        # output, so the ReLU and the residual add may overwrite that output instead of allocating a copy.
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu_(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet backbone: x [N, 3, 32, 32] -> globally average-pooled feature [N, 64].

    blocks_per_stage is n in depth = 6n + 2 (3 for ResNet-20, 18 for ResNet-110).
    """

    out_dim = STAGE_WIDTHS[-1]

    def __init__(self, blocks_per_stage: int):
        super().__init__()
        first_width = STAGE_WIDTHS[0]
        self.conv1 = nn.Conv2d(3, first_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(first_width)
        stages = []
        in_planes = first_width
        for stage_index, planes in enumerate(STAGE_WIDTHS):
            first_stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, first_stride if block_index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.apply(kaiming_init)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))  # [N, 64, 8, 8]
        # Global average pooling, written as the mean that F.adaptive_avg_pool2d(out, 1) dispatches to anyway;
        # the general adaptive-pool backward has no deterministic CUDA kernel (tests/test_step_ops.py).
        return out.mean(dim=(2, 3))  # [N, 64]


def cifar_resnet_models() -> dict[str, Callable[[], CifarResNet]]:
    """Name -> backbone constructor for ResNet-8/20/32/44/56/110 (depth = 6n + 2)."""
    return {f"resnet{6 * n + 2}": partial(CifarResNet, n) for n in (1, 3, 5, 7, 9, 18)}
