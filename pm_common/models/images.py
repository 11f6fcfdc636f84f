"""Image classifiers that Opacus can train with per-sample gradient clipping.

* ``small-cnn``: :class:`SmallCNN`, for CPU sites and simulations.
* ``densenet121``: MONAI's 2-D DenseNet121 with GroupNorm instead of BatchNorm, for GPU sites.

Both avoid BatchNorm (it mixes samples in a batch, which breaks per-sample privacy accounting)
and pass ``opacus.validators.ModuleValidator.validate(model, strict=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule, register_grad_sampler
from torch import nn

IMAGE_MODELS: tuple[str, ...] = ("small-cnn", "densenet121")


class GroupedGradConv2d(nn.Conv2d):
    """A Conv2d whose per-sample gradients Opacus computes as one grouped convolution.

    Opacus' default for Conv2d unfolds the input (im2col) and runs a batched einsum; for the small
    layers of :class:`SmallCNN` that is 2-6x slower on CPU than torch's own weight-gradient
    kernel run with one group per sample (`_grouped_conv_grad_sample`). Same maths, same numbers
    up to float rounding; only the registered sampler differs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.padding, str) or self.padding_mode != "zeros":
            raise ValueError("GroupedGradConv2d takes numeric zero padding only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _opacus_hooks_replace_grad(self):
            return super().forward(x)
        out = _InputGradOnlyConv.apply(x, self.weight, self)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


def _opacus_hooks_replace_grad(layer: nn.Module) -> bool:
    """True while Opacus' hooks mode computes this layer's per-sample gradients: then the DP
    optimizer overwrites the weight's batch gradient with the clipped, noised per-sample sum, so
    autograd need not compute it. Not for ghost clipping, whose second backward pass needs it."""
    for hook in layer._forward_hooks.values():
        owner = getattr(hook, "__self__", None)
        if type(owner) is GradSampleModule and owner.hooks_enabled and not owner.force_functorch:
            return True
    return False


class _InputGradOnlyConv(torch.autograd.Function):
    """conv2d whose backward returns the input's gradient only (see `_opacus_hooks_replace_grad`).

    The weight's per-sample gradients still come from Opacus' backward hook on the layer; only the
    unused batch weight gradient, about a third of an ordinary step's convolution work, is skipped.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, layer: GroupedGradConv2d) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.input_shape, ctx.layer = x.shape, layer
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        layer = ctx.layer
        grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad_out, layer.stride,
                                            layer.padding, layer.dilation, layer.groups)
        return grad_x, None, None


@register_grad_sampler(GroupedGradConv2d)
def _grouped_conv_grad_sample(
    layer: GroupedGradConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample weight gradients: the batch folded into channels, one conv group per sample."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if n == 0:  # Poisson sampling can draw an empty batch; mirror Opacus' own conv sampler
        out[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
        return out
    if layer.weight.requires_grad:
        grads = torch.nn.grad.conv2d_weight(
            x.reshape(1, n * layer.in_channels, *x.shape[2:]),
            (n * layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size),
            backprops.reshape(1, n * layer.out_channels, *backprops.shape[2:]),
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=n * layer.groups,
        )
        out[layer.weight] = grads.view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


class SmallCNN(nn.Module):
    """A few-thousand-parameter CNN that is cheap to train with DP-SGD on a CPU.

    Each choice keeps per-sample gradients cheap or the task learnable:
    * inputs of 64 px and more are average-pooled to ~32 px first (no parameters, so no
      per-sample gradient work at full resolution);
    * 3 conv blocks (3x3 conv -> GroupNorm -> ReLU, max-pool between), widths (8, 16, 32);
      convolutions are :class:`GroupedGradConv2d` (fast exact per-sample gradients);
    * GroupNorm without affine parameters: the next convolution absorbs the scale, and Opacus
      no longer re-normalises every activation to get GroupNorm's per-sample gradients (that
      alone was about a third of the DP overhead);
    * a global max pool head: a lesion is a small local finding, "is it anywhere?", which an
      average over the whole image dilutes;
    * the pooled features are normalised (layer norm without parameters, scaled to unit length)
      before the linear layer. Raw max-pooled activations have a norm of ~15, so under DP-SGD the
      head's per-sample gradient ((p - y) times the features) took nearly all of each clipped
      gradient, and the noise added to the head's weights became one large random logit offset
      shared by every image: models collapsed to predicting one class. Normalised, the
      convolutions get their share of the clipped gradient (it also learns faster without DP).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        widths: tuple[int, ...] = (8, 16, 32),
    ) -> None:
        super().__init__()
        if image_size < 16:
            raise ValueError(f"SmallCNN needs image_size >= 16, got {image_size}")
        pool = max(1, image_size // 32)
        layers: list[nn.Module] = [nn.AvgPool2d(pool)] if pool > 1 else []
        channels = in_channels
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [
                GroupedGradConv2d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.GroupNorm(min(8, width), width, affine=False),
                nn.ReLU(),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, C, H, W)."""
        pooled = self.features(x).amax(dim=(2, 3))
        width = pooled.shape[1]
        return self.head(F.layer_norm(pooled, (width,)) / math.sqrt(width))


def build_image_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The named model, freshly initialised; MONAI is imported only for DenseNet121."""
    if name == "small-cnn":
        return SmallCNN(in_channels, num_classes, image_size)
    if name == "densenet121":
        from monai.networks.nets import DenseNet121

        return DenseNet121(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=num_classes,
            norm=("group", {"num_groups": 8}),
            # MONAI's default in-place ReLU breaks Opacus' backward hooks ("view modified
            # inplace") even though ModuleValidator passes it.
            act=("relu", {"inplace": False}),
        )
    raise ValueError(f"unknown image model {name!r}; choose one of {IMAGE_MODELS}")
