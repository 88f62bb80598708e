"""Models: the CIFAR ResNet backbones and the hybrid network built on them."""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping

from torch import nn

from networks.hybrid import HybridNet, HybridOutput
from networks.resnet_cifar import CifarResNet, cifar_resnet_models
from util import UserError

# Read-only view so no caller can add or swap a backbone behind everyone else's back.
MODELS: Mapping[str, Callable[[], nn.Module]] = MappingProxyType(cifar_resnet_models())


def build_model(name: str, num_classes: int, feat_dim: int = 128, use_prototypes: bool = False) -> HybridNet:
    """The hybrid network on backbone `name` ("resnet20", "resnet32", ...), with C = num_classes outputs.

    feat_dim is the projection (and prototype) width; use_prototypes adds the PSC prototypes [C, feat_dim].
    """
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; choose from {', '.join(MODELS)}")
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    if feat_dim < 1:
        raise UserError(f"feat_dim must be at least 1, got {feat_dim}")
    return HybridNet(MODELS[name](), num_classes, feat_dim=feat_dim, use_prototypes=use_prototypes)


__all__ = ["MODELS", "build_model", "HybridNet", "HybridOutput", "CifarResNet"]
