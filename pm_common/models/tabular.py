"""Models every site and the coordinator build identically from the study config.

All are Opacus-compatible: only Linear layers and element-wise activations (no BatchNorm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LogisticRegression(nn.Module):
    """One linear layer: FLamby's Fed-Heart-Disease baseline model (one output per class, interval or
    value; a single output is returned as one number per row)."""

    def __init__(self, num_inputs: int, num_outputs: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(num_inputs, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out.squeeze(-1) if out.shape[-1] == 1 else out


class MLP(nn.Module):
    """A small multilayer perceptron for tabular risk prediction; returns one logit per row."""

    def __init__(self, num_inputs: int, hidden: Sequence[int] = (32,), num_outputs: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = num_inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out.squeeze(-1) if out.shape[-1] == 1 else out


class DiscreteCox(nn.Module):
    """A discrete-time proportional-hazards model (Andreux et al. 2020, "Federated Survival Analysis with
    Discrete-Time Cox Models"): logit h_k(x) = b_k + x.beta, one slope shared by every interval and
    one baseline logit per interval. It has inputs + outputs parameters where `logreg` has
    (inputs + 1) x outputs, so under DP-SGD the same noise is spread over far fewer coordinates, and
    every interval's events teach the same slope. The baseline is a bias-free Linear layer applied to
    a constant 1 so that Opacus computes its per-example gradients like any Linear layer's.
    With one output it is a logistic (or linear) regression."""

    def __init__(self, num_inputs: int, num_outputs: int = 1) -> None:
        super().__init__()
        self.risk = nn.Linear(num_inputs, 1, bias=False)
        self.baseline = nn.Linear(1, num_outputs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.risk(x) + self.baseline(torch.ones_like(x[:, :1]))
        return out.squeeze(-1) if out.shape[-1] == 1 else out


TABULAR_MODELS = ("logreg", "mlp", "discrete-cox")


def build_tabular_model(
    name: str, num_inputs: int, hidden: Sequence[int] = (32,), seed: int = 0, num_outputs: int = 1
) -> nn.Module:
    """Same name, inputs, outputs and seed give the same initial weights at every site and the coordinator.

    `num_outputs`: 1 for a binary logit or a regression value, one per class, one hazard logit per
    survival interval."""
    torch.manual_seed(seed)
    if name == "logreg":
        return LogisticRegression(num_inputs, num_outputs)
    if name == "mlp":
        return MLP(num_inputs, hidden, num_outputs)
    if name == "discrete-cox":
        return DiscreteCox(num_inputs, num_outputs)
    raise ValueError(f"unknown tabular model {name!r}; choose one of {TABULAR_MODELS}")


OPACUS_MODES = ("hooks", "ew", "functorch", "ghost")
AUTO_MODE = "auto"
FASTEST_GRAD_SAMPLE_MODE: dict[str, str] = {
    "logreg": "hooks",
    "mlp": "hooks",
    "discrete-cox": "hooks",
    "small-cnn": "hooks",
    "densenet121": "ghost",
}
"""What `grad_sample_mode = "auto"` trains each model with: its fastest Opacus mode that works with
Poisson sampling's empty batches, measured on CPU with one thread (benchmarks/dp_slowdown.py,
benchmarks/imaging_throughput.py; README). `ew` is faster for the tabular models but fails on empty
batches (and on DenseNet121 outright); `functorch` is slower for every model here. DenseNet121:
`ghost` and `hooks` take the same CPU time per step (3.3x non-private at batch 16 and 32), and
ghost clipping needs under half the memory (591 vs 1329 MB at batch 32), so GPU sites can use
larger physical batches; not yet timed on a GPU."""


def resolve_grad_sample_mode(requested: str, model_name: str) -> str:
    """The Opacus grad-sample mode a study trains with: `requested`, or the model's fastest if "auto"."""
    if requested == AUTO_MODE:
        return FASTEST_GRAD_SAMPLE_MODE.get(model_name, "hooks")
    if requested not in OPACUS_MODES:
        raise ValueError(f"grad_sample_mode must be {AUTO_MODE!r} or one of {OPACUS_MODES}: {requested!r}")
    return requested


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without Opacus' `_module.` wrapper prefix, detached on the CPU."""
    module = getattr(model, "_module", model)
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
