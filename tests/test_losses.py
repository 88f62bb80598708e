"""losses.py against naive per-anchor loops in float64, under bf16 autocast, and on a toy training problem."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses import ALPHA_SCHEDULES, METHODS, HybridLoss, LossTerms, hybrid_alpha, psc_loss, supcon_loss
from util import UserError


def reference_supcon(features, labels, temperature):
    """Khosla et al.'s SC loss, one anchor at a time; anchors without a positive contribute 0 to the mean."""
    batch_size, num_views, _ = features.shape
    views = [(features[b, v], int(labels[b])) for b in range(batch_size) for v in range(num_views)]
    anchor_losses = []
    for i, (z_i, y_i) in enumerate(views):
        denominator = sum(torch.exp(z_i @ z_k / temperature) for k, (z_k, _) in enumerate(views) if k != i)
        positive_terms = [
            -torch.log(torch.exp(z_i @ z_p / temperature) / denominator)
            for p, (z_p, y_p) in enumerate(views)
            if p != i and y_p == y_i
        ]
        anchor_losses.append(sum(positive_terms) / len(positive_terms) if positive_terms else features.new_zeros(()))
    return sum(anchor_losses) / len(anchor_losses)


def reference_psc(features, labels, prototypes, temperature, exclude_positive):
    """The paper's PSC (or the all-class softmax), one view at a time."""
    unit_prototypes = [p / p.norm() for p in prototypes]
    view_losses = []
    for b in range(features.shape[0]):
        y = int(labels[b])
        for v in range(features.shape[1]):
            z = features[b, v]
            denominator = sum(
                torch.exp(z @ p_j / temperature)
                for j, p_j in enumerate(unit_prototypes)
                if not (exclude_positive and j == y)
            )
            view_losses.append(-torch.log(torch.exp(z @ unit_prototypes[y] / temperature) / denominator))
    return sum(view_losses) / len(view_losses)


# (num_views, feat_dim, temperature, labels): repeated labels everywhere; a class seen once in each
# case; V = 1 with a singleton class is the "anchor without a positive" case.
SUPCON_CASES = [
    (2, 5, 0.1, [0, 0, 1, 1, 1, 2]),
    (1, 4, 0.1, [0, 1, 1, 2, 2]),
    (3, 8, 0.5, [1, 0, 1, 3]),
    (2, 3, 0.07, [2, 2, 2, 0, 1, 1, 0]),
]


@pytest.mark.parametrize("num_views, feat_dim, temperature, labels", SUPCON_CASES)
def test_supcon_matches_reference_loop(num_views, feat_dim, temperature, labels):
    generator = torch.Generator().manual_seed(len(labels) * 10 + num_views)
    labels = torch.tensor(labels)
    raw = torch.randn(len(labels), num_views, feat_dim, dtype=torch.float64, generator=generator, requires_grad=True)

    loss = supcon_loss(F.normalize(raw, dim=-1), labels, temperature)
    (grad,) = torch.autograd.grad(loss, raw)
    expected = reference_supcon(F.normalize(raw, dim=-1), labels, temperature)
    (expected_grad,) = torch.autograd.grad(expected, raw)

    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)


def reference_supcon_with_base_temperature(features, labels, temperature, base_temperature):
    """SupContrast's loss as its code computes it: per anchor -(t / b) * mean over positives of
    (logit - log sum over all other views of exp(logit)), logits z_i.z_k / t; mean over anchors."""
    batch_size, num_views, _ = features.shape
    views = [(features[b, v], int(labels[b])) for b in range(batch_size) for v in range(num_views)]
    total = features.new_zeros(())
    for i, (z_i, y_i) in enumerate(views):
        log_norm = torch.log(sum(torch.exp(z_i @ z_k / temperature) for k, (z_k, _) in enumerate(views) if k != i))
        positives = [z_i @ z_p / temperature - log_norm for p, (z_p, y_p) in enumerate(views) if p != i and y_p == y_i]
        total = total - (temperature / base_temperature) * sum(positives) / len(positives)
    return total / len(views)


@pytest.mark.parametrize("temperature, base_temperature", [(0.1, 0.07), (0.5, 1.0), (0.07, 0.07)])
def test_supcon_base_temperature_is_supcontrasts_factor(temperature, base_temperature):
    generator = torch.Generator().manual_seed(11)
    labels = torch.tensor([0, 1, 1, 2, 0, 1])
    raw = torch.randn(len(labels), 2, 5, dtype=torch.float64, generator=generator, requires_grad=True)

    loss = supcon_loss(F.normalize(raw, dim=-1), labels, temperature, base_temperature)
    (grad,) = torch.autograd.grad(loss, raw)
    expected = reference_supcon_with_base_temperature(F.normalize(raw, dim=-1), labels, temperature, base_temperature)
    (expected_grad,) = torch.autograd.grad(expected, raw)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)
    without = supcon_loss(F.normalize(raw, dim=-1), labels, temperature)  # the default: the paper's formula
    assert loss.item() == pytest.approx(without.item() * temperature / base_temperature, rel=1e-12)


# (num_views, feat_dim, temperature, labels, num_classes): class 3 of 5 never appears in the first case.
PSC_CASES = [
    (2, 5, 1.0, [0, 0, 1, 2, 2, 4], 5),
    (1, 4, 0.1, [1, 0, 1], 2),
    (3, 6, 0.1, [2, 0, 2, 1, 1], 3),
]


@pytest.mark.parametrize("exclude_positive", [True, False])
@pytest.mark.parametrize("num_views, feat_dim, temperature, labels, num_classes", PSC_CASES)
def test_psc_matches_reference_loop(num_views, feat_dim, temperature, labels, num_classes, exclude_positive):
    generator = torch.Generator().manual_seed(len(labels) * 10 + num_views)
    labels = torch.tensor(labels)
    raw = torch.randn(len(labels), num_views, feat_dim, dtype=torch.float64, generator=generator, requires_grad=True)
    # Prototypes off the unit sphere, to check psc_loss normalises them itself.
    prototypes = (3 * torch.randn(num_classes, feat_dim, dtype=torch.float64, generator=generator)).requires_grad_()

    loss = psc_loss(F.normalize(raw, dim=-1), labels, prototypes, temperature, exclude_positive)
    grads = torch.autograd.grad(loss, (raw, prototypes))
    expected = reference_psc(F.normalize(raw, dim=-1), labels, prototypes, temperature, exclude_positive)
    expected_grads = torch.autograd.grad(expected, (raw, prototypes))

    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)


def test_psc_denominators_differ_as_the_formula_says():
    """Excluding the positive removes exactly exp(z.p_y/t) from the denominator; the paper's form can go negative."""
    features = F.normalize(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), dim=-1)  # [2, 1, 2], on the prototypes
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1])
    temperature = 0.5
    excluded = psc_loss(features, labels, prototypes, temperature, exclude_positive=True)
    full = psc_loss(features, labels, prototypes, temperature, exclude_positive=False)
    # View 0: positive logit 2, negatives 0 and -2; view 1: positive 2, negatives 0 and 0.
    expected_excluded = ((math.log(1 + math.exp(-2)) - 2) + (math.log(2) - 2)) / 2
    expected_full = ((math.log(math.exp(2) + 1 + math.exp(-2)) - 2) + (math.log(math.exp(2) + 2) - 2)) / 2
    assert excluded.item() == pytest.approx(expected_excluded, abs=1e-6)
    assert full.item() == pytest.approx(expected_full, abs=1e-6)
    assert excluded.item() < 0 < full.item()


def test_supcon_without_positives_is_finite():
    raw = torch.randn(4, 1, 6, requires_grad=True)
    loss = supcon_loss(F.normalize(raw, dim=-1), torch.tensor([0, 1, 2, 3]), 0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(raw.grad).all()
    single = supcon_loss(F.normalize(torch.randn(1, 1, 6), dim=-1), torch.tensor([5]), 0.1)
    assert single.item() == 0.0


def test_shape_errors():
    features = F.normalize(torch.randn(3, 2, 4), dim=-1)
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(features, torch.tensor([0, 1]), 0.1)
    with pytest.raises(ValueError, match=r"\[B, V, D\]"):
        supcon_loss(features[:, 0], torch.tensor([0, 1, 2]), 0.1)
    with pytest.raises(ValueError, match="prototypes"):
        psc_loss(features, torch.tensor([0, 1, 0]), torch.randn(2, 5), 0.1)
    with pytest.raises(ValueError, match="2 classes"):
        psc_loss(features, torch.tensor([0, 0, 0]), torch.randn(1, 4), 0.1)


def _bf16_and_float32_features(num_views: int, batch_size: int = 32):
    """The same [B, V, D] features from a small Linear, once inside bf16 autocast and once in float32.

    B = 32 because the two differ by bf16's rounding of the features themselves, which the 1/t = 10
    magnifies; averaging over 64 views keeps that under 1e-2 (max 0.008 over 200 seeds), where
    B = 6 exceeded it for about 15% of seeds.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        linear = nn.Linear(8, 16)
        inputs = torch.randn(batch_size * num_views, 8)
        labels = torch.randint(0, 3, (batch_size,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_features = F.normalize(linear(inputs), dim=-1).reshape(batch_size, num_views, 16)  # [B, V, D]
    float32_features = F.normalize(linear(inputs), dim=-1).reshape(batch_size, num_views, 16)
    assert bf16_features.dtype == torch.bfloat16
    return bf16_features, float32_features, labels


def test_supcon_under_bf16_autocast_matches_float32():
    bf16_features, float32_features, labels = _bf16_and_float32_features(num_views=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss = supcon_loss(bf16_features, labels, 0.1)
    assert bf16_loss.dtype == torch.float32
    # The loss's own maths is float32: same answer as float32 maths on the same (bf16-valued) inputs.
    assert bf16_loss.item() == pytest.approx(supcon_loss(bf16_features.float(), labels, 0.1).item(), abs=1e-6)
    assert bf16_loss.item() == pytest.approx(supcon_loss(float32_features, labels, 0.1).item(), abs=1e-2)


@pytest.mark.parametrize("exclude_positive", [True, False])
def test_psc_under_bf16_autocast_matches_float32(exclude_positive):
    bf16_features, float32_features, labels = _bf16_and_float32_features(num_views=2)
    prototypes = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss = psc_loss(bf16_features, labels, prototypes, 0.1, exclude_positive)
    exact_loss = psc_loss(bf16_features.float(), labels, prototypes, 0.1, exclude_positive)
    float32_loss = psc_loss(float32_features, labels, prototypes, 0.1, exclude_positive)
    assert bf16_loss.dtype == torch.float32
    assert bf16_loss.item() == pytest.approx(exact_loss.item(), abs=1e-6)
    assert bf16_loss.item() == pytest.approx(float32_loss.item(), abs=1e-2)


def _toy_problem():
    """Three well-separated Gaussian clusters in 4-d, two noisy 'views' of each of 12 points."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(4)  # [12]
    centres = 4 * torch.eye(3, 4)
    points = centres[labels] + 0.3 * torch.randn(12, 4, generator=generator)
    views = points[:, None] + 0.1 * torch.randn(12, 2, 4, generator=generator)  # [B, V, 4]
    return views, labels


def _train(loss_fn, parameters, steps=15, lr=0.5):
    optimizer = torch.optim.SGD(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_sgd_lowers_supcon_on_toy_problem():
    torch.manual_seed(0)
    views, labels = _toy_problem()
    encoder = nn.Linear(4, 8)
    losses = _train(lambda: supcon_loss(F.normalize(encoder(views), dim=-1), labels, 0.1), encoder.parameters())
    # SC cannot go below log|P(i)| = log 7 (each anchor's 7 positives share the numerator's mass), so
    # the clusters' head start leaves little to gain: require the excess over that bound to halve.
    excess = [loss - math.log(7) for loss in losses]
    assert excess[-1] < excess[0] / 2
    assert min(excess) > 0  # above the bound throughout: a sign error (-L also falls under SGD) fails here


@pytest.mark.parametrize("exclude_positive", [True, False])
def test_sgd_lowers_psc_and_moves_prototypes(exclude_positive):
    torch.manual_seed(0)
    views, labels = _toy_problem()
    encoder = nn.Linear(4, 8)
    prototypes = nn.Parameter(torch.randn(3, 8))
    initial_prototypes = prototypes.detach().clone()
    losses = _train(
        lambda: psc_loss(F.normalize(encoder(views), dim=-1), labels, prototypes, 1.0, exclude_positive),
        [*encoder.parameters(), prototypes],
    )
    assert losses[-1] < losses[0] - 0.1
    assert not torch.allclose(prototypes.detach(), initial_prototypes)


def test_hybrid_alpha_schedule():
    assert hybrid_alpha(0, 200) == 1.0
    assert hybrid_alpha(100, 200) == 0.75
    alphas = [hybrid_alpha(epoch, 200) for epoch in range(200)]
    assert all(later < earlier for earlier, later in zip(alphas, alphas[1:]))
    assert alphas[-1] == pytest.approx(1 - (199 / 200) ** 2) and alphas[-1] > 0
    assert alphas == [hybrid_alpha(epoch, 200, "parabolic") for epoch in range(200)]  # the default, bit for bit
    with pytest.raises(ValueError):
        hybrid_alpha(0, 0)


@pytest.mark.parametrize("schedule, formula", [
    ("parabolic", lambda t, n: 1 - (t / n) ** 2),
    ("linear", lambda t, n: 1 - t / n),
    ("cosine", lambda t, n: math.cos(math.pi / 2 * t / n)),
    ("equal", lambda t, n: 0.5),
])
def test_alpha_schedules_follow_their_formulas(schedule, formula):
    """BBN's cumulative-learning weights (T counted from 0): every value in (0, 1], never rising."""
    assert set(ALPHA_SCHEDULES) == {"parabolic", "linear", "cosine", "equal"}
    for epochs in (1, 7, 200):
        alphas = [hybrid_alpha(epoch, epochs, schedule) for epoch in range(epochs)]
        assert alphas == pytest.approx([formula(epoch, epochs) for epoch in range(epochs)], abs=1e-15)
        assert all(0 < a <= 1 for a in alphas) and all(b <= a for a, b in zip(alphas, alphas[1:]))
        assert all(type(a) is float for a in alphas)
    assert hybrid_alpha(1, 4, "linear") == 0.75 and hybrid_alpha(2, 4, "cosine") == pytest.approx(0.5 ** 0.5)
    with pytest.raises(ValueError, match="unknown alpha schedule 'step'"):
        hybrid_alpha(0, 10, "step")


def _branch_batches(num_views=2, batch_size=5, feat_dim=6, num_classes=3):
    generator = torch.Generator().manual_seed(3)
    sc_views = [F.normalize(torch.randn(batch_size, feat_dim, generator=generator), dim=1) for _ in range(num_views)]
    sc_labels = torch.tensor([0, 1, 0, 2, 1])[:batch_size]
    logits = torch.randn(4, num_classes, generator=generator, requires_grad=True)
    ce_labels = torch.tensor([2, 0, 1, 1])
    return sc_views, sc_labels, logits, ce_labels


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_hybrid_loss_sc_reads_projections_view_major(num_views):
    sc_views, sc_labels, logits, ce_labels = _branch_batches(num_views)
    terms = HybridLoss("sc", 0.1)(torch.cat(sc_views), sc_labels, logits, ce_labels, alpha=0.3)
    assert isinstance(terms, LossTerms)
    expected_feature = supcon_loss(torch.stack(sc_views, dim=1), sc_labels, 0.1)  # [B, V, D]
    expected_ce = F.cross_entropy(logits, ce_labels)
    assert terms.feature.item() == pytest.approx(expected_feature.item(), abs=1e-6)
    assert terms.ce.item() == pytest.approx(expected_ce.item(), abs=1e-6)
    assert terms.total.item() == pytest.approx(0.3 * expected_feature.item() + 0.7 * expected_ce.item(), abs=1e-6)
    assert terms.total.dim() == terms.feature.dim() == terms.ce.dim() == 0


def test_hybrid_loss_scales_only_the_sc_term_by_the_base_temperature():
    sc_views, sc_labels, logits, ce_labels = _branch_batches()
    plain = HybridLoss("sc", 0.1)(torch.cat(sc_views), sc_labels, logits, ce_labels, alpha=0.3)
    scaled = HybridLoss("sc", 0.1, base_temperature=0.07)(torch.cat(sc_views), sc_labels, logits, ce_labels, alpha=0.3)
    assert scaled.feature.item() == pytest.approx(plain.feature.item() / 0.7, rel=1e-6)
    assert scaled.ce.item() == plain.ce.item()
    assert scaled.total.item() == pytest.approx(0.3 * scaled.feature.item() + 0.7 * plain.ce.item(), rel=1e-6)
    for bad in (0.0, -0.07):
        with pytest.raises(UserError, match="base temperature must be positive"):
            HybridLoss("sc", 0.1, base_temperature=bad)


@pytest.mark.parametrize("exclude_positive", [True, False])
def test_hybrid_loss_psc_uses_prototypes(exclude_positive):
    sc_views, sc_labels, logits, ce_labels = _branch_batches()
    prototypes = torch.randn(3, 6, requires_grad=True)
    loss = HybridLoss("psc", 1.0, exclude_positive=exclude_positive, gather=_refuse_to_gather)
    terms = loss(torch.cat(sc_views), sc_labels, logits, ce_labels, alpha=0.6, prototypes=prototypes)
    expected_feature = psc_loss(torch.stack(sc_views, dim=1), sc_labels, prototypes, 1.0, exclude_positive)
    assert terms.feature.item() == pytest.approx(expected_feature.item(), abs=1e-6)
    terms.total.backward()
    assert prototypes.grad is not None and prototypes.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prototypes"):
        loss(torch.cat(sc_views), sc_labels, logits, ce_labels, alpha=0.6)


def _refuse_to_gather(tensor):
    raise AssertionError("PSC must not gather")


def test_hybrid_loss_sc_gathers_views_and_labels():
    sc_views, sc_labels, logits, ce_labels = _branch_batches()
    other_rank_views = F.normalize(torch.randn(3, 2, 6), dim=-1)  # [B_other, V, D]
    other_rank_labels = torch.tensor([2, 2, 1])

    def gather(tensor):
        other = other_rank_views if tensor.is_floating_point() else other_rank_labels
        return torch.cat([tensor, other])

    terms = HybridLoss("sc", 0.1, gather=gather)(torch.cat(sc_views), sc_labels, logits, ce_labels, alpha=1.0)
    expected = supcon_loss(
        torch.cat([torch.stack(sc_views, dim=1), other_rank_views]), torch.cat([sc_labels, other_rank_labels]), 0.1
    )
    assert terms.feature.item() == pytest.approx(expected.item(), abs=1e-6)
    assert terms.total.item() == pytest.approx(expected.item(), abs=1e-6)


def test_hybrid_loss_ce_baseline_skips_feature_branch():
    _, _, logits, ce_labels = _branch_batches()
    terms = HybridLoss("ce", 0.1)(None, None, logits, ce_labels, alpha=0.9)
    expected_ce = F.cross_entropy(logits, ce_labels)
    assert terms.feature.item() == 0.0
    assert terms.total.item() == pytest.approx(expected_ce.item(), abs=1e-6)
    assert terms.ce.item() == pytest.approx(expected_ce.item(), abs=1e-6)


def test_hybrid_loss_rejects_bad_settings():
    assert METHODS == ("sc", "psc", "ce")
    with pytest.raises(UserError, match="unknown loss method 'supcon'; choose from sc, psc, ce"):
        HybridLoss("supcon", 0.1)
    with pytest.raises(UserError, match="temperature"):
        HybridLoss("sc", 0.0)
    sc_views, sc_labels, logits, ce_labels = _branch_batches()
    with pytest.raises(ValueError, match="whole number of views"):
        HybridLoss("sc", 0.1)(torch.cat(sc_views)[:-1], sc_labels, logits, ce_labels, alpha=0.5)
