"""What the hybrid network optimises: SC or PSC on the feature branch plus cross-entropy on the classifier.

Wang et al., "Contrastive Learning based Hybrid Networks for Long-Tailed Image Classification",
CVPR 2021, arXiv 2103.14267 (the hybrid objective, PSC, the alpha schedule); supervised contrastive
loss of Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020.

The loss functions are pure functions of tensors. They take the similarities, softmax and log in at
least float32 with autocast switched off, so bf16 features from an autocast forward pass give the
float32 answer to within bf16's rounding of the inputs.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util import UserError

METHODS = ("sc", "psc", "ce")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half / bf16 / float32 inputs, float64 stays float64 (the reference tests use it)."""
    return torch.promote_types(x.dtype, torch.float32)


def _masked_out(logits: Tensor) -> float:
    """A finite stand-in for -inf: exp() of it is 0, yet 0 * it and it - it stay finite (no NaN)."""
    return torch.finfo(logits.dtype).min


def supcon_loss(
    features: Tensor, labels: Tensor, temperature: float, base_temperature: float | None = None
) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), 'all' anchors.

    For anchor i among the B*V views, with P(i) the other views of the same label:
        L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p/t) / sum_{k != i} exp(z_i.z_k/t) )
    and the loss is the mean of L_i over ALL B*V anchors (Khosla et al.'s Eq. 2 sums over them; the mean, as in
    SupContrast's code, only rescales it, and keeps it on CE's per-sample scale in the hybrid sum). base_temperature
    b, when given, multiplies the loss by t / b as SupContrast's code does (its default b = 0.07
    with t = 0.1 gives 1.43); None (the default) is b = t, no factor. An anchor with no positive
    (only possible with V = 1 and a label seen once in the batch) has L_i = 0 and still counts in
    the mean, so such a batch gives a finite, slightly smaller value rather than NaN. With V >= 2
    every anchor has a positive (its other views) and the choice never matters.

    Shape:
        features: [B, V, D], L2-normalised along D (any float dtype)
        labels:   [B] integer class labels
        returns:  0-d tensor, float32 (float64 for float64 features)
    Memory is O((B*V)^2) for the similarity matrix.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [B, V, D], got shape {tuple(features.shape)}")
    batch_size, num_views, feat_dim = features.shape
    if labels.shape != (batch_size,):
        raise ValueError(f"labels must be [B] = [{batch_size}], got shape {tuple(labels.shape)}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        # View-major flattening: anchor index = view * B + sample, so labels repeat per view.
        z = features.to(_compute_dtype(features)).transpose(0, 1).reshape(num_views * batch_size, feat_dim)  # [VB, D]
        anchor_labels = labels.repeat(num_views)  # [VB]
        logits = z @ z.T / temperature  # [VB, VB]
        self_mask = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(self_mask, _masked_out(logits))
        # logsumexp subtracts the row max, so exp never overflows even for a small temperature.
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # [VB, VB]
        positive_mask = (anchor_labels[:, None] == anchor_labels[None, :]) & ~self_mask
        # where(), not mask * log_prob: the masked diagonal of log_prob is huge and must not leak in.
        positive_log_prob = torch.where(positive_mask, log_prob, torch.zeros_like(log_prob)).sum(dim=1)  # [VB]
        num_positives = positive_mask.sum(dim=1)
        per_anchor = -positive_log_prob / num_positives.clamp(min=1)  # 0 where an anchor has no positive
        loss = per_anchor.mean()
        return loss if base_temperature is None else loss * (temperature / base_temperature)


def psc_loss(
    features: Tensor, labels: Tensor, prototypes: Tensor, temperature: float, exclude_positive: bool = True
) -> Tensor:
    """Prototypical supervised contrastive loss (Wang et al. 2021): each view against one prototype per class.

    For view z_i of label y_i, with prototypes p_c L2-normalised here:
        exclude_positive=True (the paper's form):
            L_i = -log( exp(z_i.p_{y_i}/t) / sum_{j != y_i} exp(z_i.p_j/t) )
        exclude_positive=False (the usual softmax over all C classes):
            L_i = -log( exp(z_i.p_{y_i}/t) / sum_j exp(z_i.p_j/t) )
    and the loss is the mean over the B*V views. The paper's form has no lower bound of 0: once the
    positive similarity exceeds the log-sum-exp of the negatives it goes negative, which is expected.
    It needs C >= 2 (the denominator would be empty otherwise).

    Shape:
        features:   [B, V, D], L2-normalised along D
        labels:     [B] integer class labels in [0, C)
        prototypes: [C, D], any norm
        returns:    0-d tensor, float32 (float64 for float64 inputs)
    Memory is O(B*V*C): views are only compared with prototypes, never with each other.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [B, V, D], got shape {tuple(features.shape)}")
    batch_size, num_views, feat_dim = features.shape
    if labels.shape != (batch_size,):
        raise ValueError(f"labels must be [B] = [{batch_size}], got shape {tuple(labels.shape)}")
    if prototypes.dim() != 2 or prototypes.shape[1] != feat_dim:
        raise ValueError(f"prototypes must be [C, {feat_dim}], got shape {tuple(prototypes.shape)}")
    num_classes = prototypes.shape[0]
    if exclude_positive and num_classes < 2:
        raise ValueError("psc_loss with exclude_positive needs at least 2 classes")
    compute_dtype = torch.promote_types(_compute_dtype(features), prototypes.dtype)
    with torch.autocast(device_type=features.device.type, enabled=False):
        z = features.to(compute_dtype).reshape(batch_size * num_views, feat_dim)  # [BV, D] sample-major
        view_labels = labels.repeat_interleave(num_views)  # [BV], matches the sample-major reshape
        unit_prototypes = F.normalize(prototypes.to(compute_dtype), dim=1)  # [C, D]
        logits = z @ unit_prototypes.T / temperature  # [BV, C]
        positive_logit = logits.gather(1, view_labels[:, None]).squeeze(1)  # [BV]
        if exclude_positive:
            # A comparison, not F.one_hot: one_hot checks the labels' range with a host read on some devices.
            positive_mask = view_labels[:, None] == torch.arange(num_classes, device=view_labels.device)  # [BV, C]
            logits = logits.masked_fill(positive_mask, _masked_out(logits))
        return (torch.logsumexp(logits, dim=1) - positive_logit).mean()


# Weight of the feature loss at epoch T of T_max (T from 0), by schedule: the paper's parabolic decay and the
# alternatives of BBN's cumulative-learning ablation (Zhou et al., CVPR 2020), where the paper's form comes from.
ALPHA_SCHEDULES = MappingProxyType({
    "parabolic": lambda t: 1.0 - t ** 2,           # the paper: 1 - (T / T_max)^2
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: math.cos(t * math.pi / 2),
    "equal": lambda t: 0.5,                         # no curriculum: both terms weighted alike throughout
})


def hybrid_alpha(epoch: int, epochs: int, schedule: str = "parabolic") -> float:
    """Weight of the feature loss at this epoch (counted from 0): by default the paper's 1 - (epoch / epochs)^2,
    so 1 at the start; see ALPHA_SCHEDULES for the others.

    Moves training from feature learning towards classifier learning.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if schedule not in ALPHA_SCHEDULES:
        raise ValueError(f"unknown alpha schedule {schedule!r}; expected one of {', '.join(ALPHA_SCHEDULES)}")
    return float(ALPHA_SCHEDULES[schedule](epoch / epochs))


class LossTerms(NamedTuple):
    """The hybrid loss and its parts, all 0-d tensors; feature is zeros for method "ce"."""

    total: Tensor
    feature: Tensor
    ce: Tensor


class HybridLoss(nn.Module):
    """alpha * feature loss (SC or PSC on the feature-branch batch) + (1 - alpha) * CE (classifier batch).

    method "ce" is the plain cross-entropy baseline: no feature loss, total = ce whatever alpha is.
    gather, for multi-GPU SC, all-gathers a tensor along dim 0 across processes keeping gradients;
    SC then runs on the global batch. PSC compares each view only with the prototypes, so it
    needs no gather: the per-rank means average to the global one.
    """

    def __init__(
        self,
        method: str,
        temperature: float,
        exclude_positive: bool = True,
        gather: Callable[[Tensor], Tensor] | None = None,
        base_temperature: float | None = None,
    ):
        super().__init__()
        if method not in METHODS:
            raise UserError(f"unknown loss method '{method}'; choose from {', '.join(METHODS)}")
        if not temperature > 0:
            raise UserError(f"temperature must be positive, got {temperature}")
        if base_temperature is not None and not base_temperature > 0:
            raise UserError(f"base temperature must be positive, got {base_temperature}")
        self.method = method
        self.temperature = temperature
        self.base_temperature = base_temperature  # SC only (SupContrast's t / b factor); None: no factor
        self.exclude_positive = exclude_positive
        self.gather = gather

    def extra_repr(self) -> str:
        return (f"method={self.method}, temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"exclude_positive={self.exclude_positive}")

    def forward(
        self,
        projections: Tensor | None,
        sc_labels: Tensor | None,
        logits: Tensor,
        ce_labels: Tensor,
        alpha: float | Tensor,
        prototypes: Tensor | None = None,
    ) -> LossTerms:
        """Shape:
            projections: [V*B, D] L2-normalised, view-major (torch.cat([view_1, ..., view_V])); None for "ce"
            sc_labels:   [B]; None for "ce"
            logits:      [N, C] classifier branch, ce_labels: [N]
            prototypes:  [C, D], required for "psc"
        """
        ce = F.cross_entropy(logits.float(), ce_labels)
        if self.method == "ce":
            return LossTerms(total=ce, feature=torch.zeros_like(ce), ce=ce)
        if projections is None or sc_labels is None:
            raise ValueError(f"method '{self.method}' needs projections and sc_labels")
        batch_size = sc_labels.shape[0]
        num_views = projections.shape[0] // batch_size
        if num_views * batch_size != projections.shape[0]:
            raise ValueError(f"{projections.shape[0]} projections are not a whole number of views of {batch_size}")
        views = projections.reshape(num_views, batch_size, -1).transpose(0, 1)  # [B, V, D]
        if self.method == "sc":
            if self.gather is not None:
                # Collectives want contiguous buffers; the transpose above is a strided view.
                views = self.gather(views.contiguous())  # [B_global, V, D]
                sc_labels = self.gather(sc_labels)  # [B_global]
            feature = supcon_loss(views, sc_labels, self.temperature, self.base_temperature)
        else:
            if prototypes is None:
                raise ValueError("method 'psc' needs prototypes (build the model with use_prototypes=True)")
            feature = psc_loss(views, sc_labels, prototypes, self.temperature, self.exclude_positive)
        return LossTerms(total=alpha * feature + (1.0 - alpha) * ce, feature=feature, ce=ce)
