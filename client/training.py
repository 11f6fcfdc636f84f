"""Local training at a site: DP-SGD with Opacus (Poisson sampling), or plain SGD only when asked.

The site's Opacus accountant is loaded from its saved state before training and saved after it:
it is never reset, so every step the site ever ran composes into the epsilon it reports.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pm_common.models.tabular import plain_state_dict
from pm_common.privacy.accountant import PrivacyPlan, cumulative_epsilon
from pm_common.study.config import StudyConfig


@dataclass(frozen=True)
class LocalTraining:
    """Hyperparameters of one round of local training (the study's, not the site's)."""

    learning_rate: float
    batch_size: int
    local_epochs: int
    momentum: float = 0.0
    proximal_mu: float = 0.0
    grad_sample_mode: str = "hooks"
    max_physical_batch_size: int = 0  # > 0: split Poisson batches to fit device memory


def local_training(study: StudyConfig, plan: PrivacyPlan | None, *, proximal_mu: float = 0.0,
                   local_epochs: int | None = None) -> LocalTraining:
    """The study's training settings for one stretch of local training (a federated round, or the
    personal epochs when `local_epochs` is given), at the expected batch the site's `plan` chose
    (`[training] plan = "auto"`) or else the study's."""
    training = study.training
    return LocalTraining(
        learning_rate=training.learning_rate,
        batch_size=plan.batch_size if plan is not None and plan.batch_size else training.batch_size,
        local_epochs=training.local_epochs if local_epochs is None else local_epochs,
        momentum=training.momentum,
        proximal_mu=proximal_mu,
        grad_sample_mode=training.grad_sample_mode,
        max_physical_batch_size=training.max_physical_batch_size,
    )


@dataclass(frozen=True)
class RoundOutcome:
    state_dict: dict[str, torch.Tensor]
    steps: int
    mean_loss: float
    accountant: dict[str, Any]  # updated Opacus accountant state (empty without DP)
    epsilon: float | None


def pick_device() -> torch.device:
    """A site's GPU when it has one; the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _proximal_step(
    model: nn.Module, anchor: Mapping[str, torch.Tensor], lr: float, mu: float
) -> None:
    """FedProx's term (mu/2)||w - w_global||^2 as its own gradient step.

    It does not touch the data, so applying it after the private step is post-processing and
    costs no privacy; folding it into the loss would be silently dropped by per-sample clipping.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.sub_(lr * mu * (param - anchor[name]))


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=generator)


def train_round(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    settings: LocalTraining,
    *,
    plan: PrivacyPlan | None,
    accountant_state: Mapping[str, Any],
    seed: int | None = None,
    device: torch.device | None = None,
    anchor: Mapping[str, torch.Tensor] | None = None,
) -> RoundOutcome:
    """Train `model` in place for one round; with a `plan`, as DP-SGD accounted by Opacus.

    The proximal term (`settings.proximal_mu`) pulls towards `anchor` (None: the model's own
    starting point, FedProx's global model; Ditto passes the global model to its personal one).

    `plan=None` is non-private training: only reachable when the site allowed `--no-dp`.
    Leave `seed` None outside tests: Poisson sampling and noise then draw from OS entropy. A seed
    anyone could know would make the noise predictable and void the guarantee. (Opacus'
    `secure_mode` needs torchcsprng, which does not install with torch >= 2.6.)
    """
    seed = secrets.randbits(63) if seed is None else seed
    device = device or pick_device()
    model = model.to(device).train()
    x, y = x.to(device), y.to(device)
    if anchor is None:
        anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    else:
        anchor = {k: anchor[k].detach().to(device).clone() for k, _ in model.named_parameters()}
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
    )
    loader = _loader(x, y, settings.batch_size, seed)
    if plan is None:
        losses = _epochs(model, model, optimizer, criterion, loader, settings, anchor)
        return RoundOutcome(plain_state_dict(model), len(losses), _mean(losses), {}, None)

    engine = PrivacyEngine(accountant=plan.accountant)
    engine.accountant = create_accountant(plan.accountant)
    if accountant_state:
        engine.accountant.load_state_dict(dict(accountant_state))
    flwr_level = logging.getLogger("flwr").level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=settings.grad_sample_mode,
            noise_generator=torch.Generator(device=device).manual_seed(seed),
        )
    logging.getLogger("flwr").setLevel(flwr_level)  # Opacus may switch it to DEBUG
    if settings.grad_sample_mode == "ghost":
        dp_model, dp_optimizer, dp_criterion, dp_loader = private
    else:
        (dp_model, dp_optimizer, dp_loader), dp_criterion = private, criterion
    if abs(1.0 / len(dp_loader) - plan.sample_rate) > 1e-12:
        raise RuntimeError(
            f"sampling rate drifted from the plan: Opacus uses q={1 / len(dp_loader):.6f}, "
            f"planned q={plan.sample_rate:.6f}; refusing to train with an unplanned rate"
        )
    steps_before = _total_steps(engine.accountant.history)
    losses: list[float] = []
    dp_model.train()
    try:
        with contextlib.ExitStack() as stack:
            batches = dp_loader
            if settings.max_physical_batch_size:
                # A large logical (Poisson) batch in memory-sized pieces; the optimizer steps,
                # and the accountant counts, once per logical batch.
                batches = stack.enter_context(BatchMemoryManager(
                    data_loader=dp_loader, max_physical_batch_size=settings.max_physical_batch_size,
                    optimizer=dp_optimizer))
            losses = _epochs(dp_model, model, dp_optimizer, dp_criterion, batches, settings, anchor)
    finally:
        dp_model.remove_hooks()  # the module can be trained again next round
    steps = _total_steps(engine.accountant.history) - steps_before
    return RoundOutcome(
        plain_state_dict(dp_model),
        steps,
        _mean(losses),
        engine.accountant.state_dict(),
        cumulative_epsilon(engine.accountant.history, plan.delta, plan.accountant),  # shares its cache
    )


def _epochs(
    trained: nn.Module,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    batches: Iterable,
    settings: LocalTraining,
    anchor: Mapping[str, torch.Tensor],
) -> list[float]:
    """The local epochs: one loop for plain and DP-SGD (whose optimizer privatises each step).

    `trained` is what runs forward (Opacus' wrapper under DP); `module` holds the parameters.
    """
    losses: list[float] = []
    for _ in range(settings.local_epochs):
        for xb, yb in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(trained(xb), yb)
            loss.backward()
            optimizer.step()
            skipped = getattr(optimizer, "_is_last_step_skipped", False)  # BatchMemoryManager
            if settings.proximal_mu and not skipped:
                _proximal_step(module, anchor, settings.learning_rate, settings.proximal_mu)
            if len(xb):
                losses.append(float(loss.item()))
    return losses


def _total_steps(history: list) -> int:
    return sum(int(n) for _, _, n in history)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The model's raw outputs (logits) for `x`, in evaluation mode, on the CPU.

    Evaluation mode (dropout and batch-norm updates off) whatever mode the model came in: a
    prediction must not depend on what the model did last.

    Args:
        model: the model (global or a site's).
        x: the encoded inputs.
        device: where to run it (default: the site's GPU when it has one).

    Returns:
        One row of outputs per input row.
    """
    device = device or pick_device()
    model = model.to(device).train().eval()
    return model(x.to(device)).cpu()
