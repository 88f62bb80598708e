"""The hybrid network: one backbone feeding a contrastive feature branch and a linear classifier branch."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks.resnet_cifar import kaiming_init


class HybridOutput(NamedTuple):
    """What HybridNet.forward returns for a batch of N images.

    features:    [N, 64] pooled backbone feature
    projections: [N, feat_dim] float32, L2-normalised (feature branch)
    logits:      [N, C] float32 (classifier branch)
    """

    features: Tensor
    projections: Tensor
    logits: Tensor


class HybridNet(nn.Module):
    """Backbone + projection head (64 -> 64 -> ReLU -> feat_dim) + linear classifier (64 -> C).

    With use_prototypes, also one learnable prototype per class, `prototypes: [C, feat_dim]`, for the
    PSC loss; it is trained by the same optimizer as the rest. Without it, `prototypes` is None and
    not a parameter, so checkpoints of SC / CE models carry no unused tensor.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, feat_dim: int = 128, use_prototypes: bool = False):
        super().__init__()
        self.backbone = backbone
        hidden_dim = backbone.out_dim
        self.head = nn.Sequential(
            nn.Linear(backbone.out_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, feat_dim)
        )
        self.classifier = nn.Linear(backbone.out_dim, num_classes)
        self.head.apply(kaiming_init)
        self.classifier.apply(kaiming_init)
        if use_prototypes:
            # Random unit directions: psc_loss normalises them anyway, so only the direction matters.
            self.prototypes: nn.Parameter | None = nn.Parameter(F.normalize(torch.randn(num_classes, feat_dim), dim=1))
        else:
            self.prototypes = None

    def forward_features(self, x: Tensor) -> Tensor:
        """x: [N, 3, 32, 32] -> pooled backbone feature [N, 64]."""
        return self.backbone(x)

    def classify(self, features: Tensor) -> Tensor:
        """features [N, 64] -> logits [N, C] in float32, also under bf16 autocast: bf16 logits (about 3 significant
        digits) would turn near-ties into exact ties, which argmax settles towards the lower class index (the
        head classes of a long-tailed set). The layer is tiny, so float32 costs nothing measurable."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.classifier(features.float())

    def forward_logits(self, x: Tensor) -> Tensor:
        """x: [N, 3, 32, 32] -> logits [N, C] float32; the classifier branch alone, as used at test time."""
        return self.classify(self.backbone(x))

    def forward(self, x: Tensor, split: int | None = None) -> HybridOutput:
        """x: [N, 3, 32, 32] -> HybridOutput(features [N, 64], projections [N, feat_dim], logits [N, C]).

        With split, x[:split] and x[split:] go through the backbone in two passes: in training mode each part is
        batch-normalised with its own statistics, and the running statistics are updated by the first part, then
        by the second. In eval mode the result is that of one pass."""
        if split is None:
            features = self.backbone(x)
        else:
            features = torch.cat([self.backbone(x[:split]), self.backbone(x[split:])])
        # Normalise in float32: under bf16 autocast the head's output is bf16 (about 3 significant
        # digits), and a norm off 1 by that much is magnified by the 1/t in the contrastive losses.
        projections = F.normalize(self.head(features).float(), dim=1)
        return HybridOutput(features, projections, self.classify(features))
