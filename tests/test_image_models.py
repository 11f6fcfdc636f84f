"""Image models: Opacus-valid, right shapes, exact fast per-sample gradients, DP-SGD steps run."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from pm_common.data.synthetic_imaging import generate_site
from pm_common.models.images import (
    IMAGE_MODELS,
    GroupedGradConv2d,
    SmallCNN,
    build_image_model,
)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", module="opacus")


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_models_pass_opacus_validation_and_give_logits(name: str) -> None:
    model = build_image_model(name, in_channels=1, num_classes=3, image_size=64)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (64, 3), (128, 1)])
def test_small_cnn_shapes_and_size(size: int, channels: int) -> None:
    model = SmallCNN(channels, 2, size)
    assert model(torch.rand(3, channels, size, size)).shape == (3, 2)
    assert sum(p.numel() for p in model.parameters()) < 60_000


def test_unknown_model_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="small-cnn"):
        build_image_model("resnet9000", 1, 2, 64)


def _with_plain_convs(model: nn.Module) -> nn.Module:
    """The same network and weights with Opacus' default Conv2d per-sample gradients."""
    for name, child in model.named_children():
        if isinstance(child, GroupedGradConv2d):
            plain = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                stride=child.stride,
                padding=child.padding,
                bias=child.bias is not None,
            )
            plain.load_state_dict(child.state_dict())
            setattr(model, name, plain)
        else:
            _with_plain_convs(child)
    return model


def test_grouped_per_sample_gradients_equal_opacus_defaults() -> None:
    torch.manual_seed(0)
    fast = SmallCNN(1, 2, 64)
    reference = _with_plain_convs(SmallCNN(1, 2, 64))
    reference.load_state_dict(fast.state_dict())
    assert any(isinstance(m, GroupedGradConv2d) for m in fast.modules())
    assert not any(isinstance(m, GroupedGradConv2d) for m in reference.modules())
    x, y = torch.rand(6, 1, 64, 64), torch.randint(0, 2, (6,))
    for model in (fast, reference):
        nn.functional.cross_entropy(GradSampleModule(model)(x), y).backward()
    for a, b in zip(fast.parameters(), reference.parameters(), strict=True):
        assert a.grad_sample.shape == (6, *a.shape)
        torch.testing.assert_close(a.grad_sample, b.grad_sample, rtol=1e-4, atol=1e-5)
    # Per-sample gradients sum to the ordinary (mean-loss) batch gradient times the batch size.
    plain = SmallCNN(1, 2, 64)
    plain.load_state_dict(fast.state_dict())
    nn.functional.cross_entropy(plain(x), y).backward()
    for p, q in zip(fast.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad_sample.sum(0), q.grad * 6, rtol=1e-4, atol=1e-5)


def test_hooks_mode_skips_only_the_unused_batch_weight_gradient() -> None:
    """Under Opacus' hooks the convolutions' batch weight gradients are not computed (the DP
    optimizer replaces them); a noiseless clipped step still equals Opacus' own Conv2d path."""
    torch.manual_seed(0)
    fast = SmallCNN(1, 2, 32)
    reference = _with_plain_convs(SmallCNN(1, 2, 32))
    reference.load_state_dict(fast.state_dict())
    x, y = torch.rand(8, 1, 32, 32), torch.randint(0, 2, (8,))
    convs = [m for m in fast.modules() if isinstance(m, GroupedGradConv2d)]
    for model in (fast, reference):
        optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=0.0,
                                max_grad_norm=0.1, expected_batch_size=8)
        wrapped = GradSampleModule(model)
        nn.functional.cross_entropy(wrapped(x), y).backward()
        if model is fast:
            assert all(conv.weight.grad is None and conv.weight.grad_sample is not None for conv in convs)
        optimizer.step()
        wrapped.remove_hooks()
    for a, b in zip(fast.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    nn.functional.cross_entropy(fast(x), y).backward()  # without Opacus: an ordinary Conv2d
    assert all(conv.weight.grad is not None for conv in convs)


def test_grouped_conv_handles_stride_bias_and_rejects_string_padding() -> None:
    torch.manual_seed(1)
    conv = GroupedGradConv2d(3, 4, kernel_size=3, stride=2, padding=1, bias=True)
    ref = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1, bias=True)
    ref.load_state_dict(conv.state_dict())
    x = torch.rand(5, 3, 9, 9)
    for layer in (conv, ref):
        GradSampleModule(layer)(x).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad_sample, ref.weight.grad_sample)
    torch.testing.assert_close(conv.bias.grad_sample, ref.bias.grad_sample)
    with pytest.raises(ValueError, match="padding"):
        GroupedGradConv2d(1, 1, 3, padding="same")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_one_dp_sgd_step_on_small_cnn(mode: str) -> None:
    torch.manual_seed(0)
    model = SmallCNN(1, 2, 32)
    before = [p.detach().clone() for p in model.parameters()]
    data = torch.utils.data.TensorDataset(torch.rand(64, 1, 32, 32), torch.randint(0, 2, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    criterion = nn.CrossEntropyLoss()
    extra = {"criterion": criterion} if mode == "ghost" else {}
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        **extra,
    )
    assert len(out) == (4 if mode == "ghost" else 3)
    dp_model, dp_optimizer, dp_loader = out[0], out[1], out[-1]
    if mode == "ghost":
        criterion = out[2]
    x, y = next(iter(dp_loader))
    while len(y) == 0:  # Poisson sampling may draw an empty batch
        x, y = next(iter(dp_loader))
    dp_optimizer.zero_grad()
    criterion(dp_model(x), y).backward()
    dp_optimizer.step()
    after = list(model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert engine.accountant.history == [(1.0, 1 / 4, 1)]
    assert 0 < engine.get_epsilon(delta=1e-5) < 10


def test_one_dp_sgd_step_on_densenet() -> None:
    torch.manual_seed(0)
    model = build_image_model("densenet121", 1, 2, 32)
    data = torch.utils.data.TensorDataset(torch.rand(8, 1, 32, 32), torch.randint(0, 2, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dp_model, dp_optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    weight = model.class_layers.out.weight
    before = weight.detach().clone()
    x, y = data.tensors
    dp_optimizer.zero_grad()
    nn.functional.cross_entropy(dp_model(x[:4]), y[:4]).backward()
    assert weight.grad_sample.shape == (4, *weight.shape)
    dp_optimizer.step()
    assert not torch.equal(before, weight)


def test_small_cnn_learns_synthetic_lesions_in_a_few_epochs() -> None:
    """Learnable (clearly above chance after 4 short epochs) but not trivially separable."""
    images, labels = generate_site(800, seed=0)
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    y = torch.from_numpy(labels)
    torch.manual_seed(0)
    model = SmallCNN(1, 2, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(0)
    accuracy = []
    for _ in range(4):
        perm = torch.randperm(600, generator=order)
        for i in range(0, 600, 32):
            idx = perm[i : i + 32]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        with torch.no_grad():
            accuracy.append(float((model(x[600:]).argmax(1) == y[600:]).float().mean()))
    assert 0.4 < float(y[600:].float().mean()) < 0.6  # chance is ~0.5
    assert accuracy[0] < 0.7 and 0.68 <= accuracy[-1] < 0.97, accuracy
