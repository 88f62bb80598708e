"""networks/: parameter counts against the published table, shapes, channels_last, prototypes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses import psc_loss
from networks import MODELS, HybridNet, HybridOutput, build_model
from util import UserError

# akamaster's table (with a 10-way fc) minus that fc's 650 parameters. ResNet-8 is not in the table; by hand: conv1 432
# + bn1 32, then one block per stage: 16->16 (2 x 2,304 + 2 x 32), 16->32 (4,608 + 9,216 + 2 x 64), 32->64
# (18,432 + 36,864 + 2 x 128): 464 + 4,672 + 13,952 + 55,552 = 74,640.
BACKBONE_PARAMETERS = {
    "resnet8": 74_640,
    "resnet20": 269_072,
    "resnet32": 463_504,
    "resnet44": 657_936,
    "resnet56": 852_368,
    "resnet110": 1_727_312,
}


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("name", list(BACKBONE_PARAMETERS))
def test_backbone_parameter_counts(name):
    backbone = MODELS[name]()
    assert _count(backbone) == BACKBONE_PARAMETERS[name]
    assert backbone.out_dim == 64


def test_models_lists_exactly_the_family():
    assert sorted(MODELS) == sorted(BACKBONE_PARAMETERS)


def _images(batch_size=3, seed=0):
    return torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_backbone_output_shape():
    features = MODELS["resnet20"]()(_images())
    assert features.shape == (3, 64)


def test_backbone_feature_is_the_global_average_of_the_last_stage():
    backbone = MODELS["resnet20"]().double()
    captured = []
    backbone.layer3.register_forward_hook(lambda module, inputs, output: captured.append(output))
    features = backbone(_images().double())
    [last_stage] = captured
    assert last_stage.shape == (3, 64, 8, 8)
    torch.testing.assert_close(features, torch.nn.functional.adaptive_avg_pool2d(last_stage, 1).flatten(1))


@pytest.mark.parametrize("in_planes, planes, stride", [(16, 16, 1), (16, 32, 2), (32, 64, 2)])
def test_basic_block_is_relu_of_its_branch_plus_the_option_a_shortcut(in_planes, planes, stride):
    """With the convolutions zeroed the residual branch is 0 (eval-mode batch norm, bias 0), so the block's output
    is ReLU(shortcut(x)): x itself, or x[:, :, ::2, ::2] with planes // 4 zero channels on each side (option A).
    Fails without the residual add, without the last ReLU, or with another subsampling grid."""
    from networks.resnet_cifar import BasicBlock

    torch.manual_seed(0)
    block = BasicBlock(in_planes, planes, stride).double().eval()
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.conv2.weight.zero_()
    x = torch.randn(2, in_planes, 16, 16, dtype=torch.float64)  # negative values too: the ReLU matters
    pad = planes // 4
    shortcut = x if stride == 1 else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))
    torch.testing.assert_close(block(x), F.relu(shortcut), rtol=0, atol=0)


def test_backbone_weights_are_kaiming_normal_fan_in():
    """He et al.'s init by fan-in, as akamaster's: where a convolution doubles the width (16 -> 32 channels) the
    std is sqrt(2 / (16 * 9)) = 0.118, where fan-out would give sqrt(2 / (32 * 9)) = 0.083 (4,608 draws estimate
    the std to about 1 %)."""
    from networks.resnet_cifar import CifarResNet

    torch.manual_seed(0)
    backbone = CifarResNet(3)
    assert backbone.layer2[0].conv1.weight.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.05)
    assert backbone.layer3[0].conv1.weight.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.05)


def test_hybrid_forward_fields_and_shapes():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=7, feat_dim=32)
    assert isinstance(model, HybridNet)
    head_layers = list(model.head)
    assert [type(layer) for layer in head_layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head_layers[0].in_features, head_layers[0].out_features, head_layers[2].out_features) == (64, 64, 32)
    assert (model.classifier.in_features, model.classifier.out_features) == (64, 7)

    model.eval()  # running statistics, so the three forward paths see identical BatchNorm behaviour
    images = _images()
    output = model(images)
    assert isinstance(output, HybridOutput)
    assert output.features.shape == (3, 64)
    assert output.projections.shape == (3, 32) and output.projections.dtype == torch.float32
    assert output.logits.shape == (3, 7)
    torch.testing.assert_close(output.projections.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(model.forward_features(images), output.features)
    torch.testing.assert_close(model.forward_logits(images), output.logits)


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)]


def test_split_forward_normalises_each_part_with_its_own_batch_statistics():
    """forward(x, split=k) in training mode is x[:k] and x[k:] through the network one after the other (their
    outputs and the running statistics they leave); it differs from one pass, and in eval mode equals it."""
    import copy

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=5, feat_dim=16)
    images = torch.randn(10, 3, 32, 32) * torch.linspace(0.5, 2.0, 10).view(10, 1, 1, 1)  # parts differ in scale
    one_by_one, joint = copy.deepcopy(model), copy.deepcopy(model)
    split = model(images, split=6)
    first, second = one_by_one(images[:6]), one_by_one(images[6:])
    for name in ("features", "projections", "logits"):
        torch.testing.assert_close(getattr(split, name), torch.cat([getattr(first, name), getattr(second, name)]))
    for mine, theirs in zip(_bn_state(model), _bn_state(one_by_one), strict=True):
        torch.testing.assert_close(mine, theirs)
    assert not torch.allclose(joint(images).logits, split.logits, atol=1e-3)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images, split=6).logits, model(images).logits)


def test_projections_are_float32_unit_vectors_under_bf16_autocast():
    model = build_model("resnet20", num_classes=3, feat_dim=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(_images(batch_size=2))
    assert output.features.dtype == torch.bfloat16  # autocast really was on
    assert output.projections.dtype == torch.float32
    # The classifier runs in float32 on the (bf16) features: bf16 logits would make near-ties exact ties.
    assert output.logits.dtype == torch.float32
    torch.testing.assert_close(output.logits, model.classifier(output.features.float()), rtol=0, atol=0)
    torch.testing.assert_close(output.projections.norm(dim=1), torch.ones(2))


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=5)
    images = _images(batch_size=4)
    expected = model(images)  # train mode: batch statistics, the same for both layouts
    model = model.to(memory_format=torch.channels_last)
    output = model(images.contiguous(memory_format=torch.channels_last))
    for got, want in zip(output, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_build_model_rejects_unknown_name():
    with pytest.raises(UserError, match="unknown model 'resnet18'; choose from resnet8, resnet20, resnet32, resnet44"):
        build_model("resnet18", num_classes=10)


def test_prototypes_only_with_use_prototypes_and_trained_by_psc():
    plain = build_model("resnet20", num_classes=4, feat_dim=8)
    assert plain.prototypes is None
    assert not any("prototypes" in name for name, _ in plain.named_parameters())
    assert _count(plain) == BACKBONE_PARAMETERS["resnet20"] + (64 * 64 + 64) + (64 * 8 + 8) + (64 * 4 + 4)

    model = build_model("resnet20", num_classes=4, feat_dim=8, use_prototypes=True)
    assert isinstance(model.prototypes, nn.Parameter) and model.prototypes.shape == (4, 8)
    assert "prototypes" in dict(model.named_parameters())
    assert "prototypes" in model.state_dict()

    images = _images(batch_size=4)
    projections = model(images).projections  # [B, D], one view
    loss = psc_loss(projections[:, None], torch.tensor([0, 1, 2, 1]), model.prototypes, 0.1)
    loss.backward()
    assert model.prototypes.grad is not None and model.prototypes.grad.abs().sum() > 0
