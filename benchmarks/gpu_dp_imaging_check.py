"""Prove that a DP-SGD imaging training round trains on a CUDA GPU, and record what it cost.

One site's training round on synthetic scans (pm_common.data.synthetic_imaging, read back through the
real NPZ loader): Opacus DP-SGD with a large logical batch (default 512) split into physical
batches by Opacus' BatchMemoryManager, noise calibrated to a target epsilon for the round.
Records images/s, peak GPU memory, epsilon spent, logical/physical step counts and test balanced
accuracy before/after, and writes them as JSON to --out.

Self-contained on purpose: imports only torch, opacus, monai (via the model), numpy and pm_common
(the GPU machine has no flwr).

    python -m benchmarks.gpu_dp_imaging_check --require-cuda --out /tmp/gpu_check.json
    python -m benchmarks.gpu_dp_imaging_check --device cpu --quick --out /tmp/cpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import opacus
import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn

from pm_common.data.imaging import ImageSpec, load_image_site
from pm_common.data.synthetic_imaging import CLASSES, generate_federation
from pm_common.models.images import build_image_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; `--quick` shrinks data and batches so a CPU run takes seconds."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--require-cuda", action="store_true", help="exit non-zero without CUDA")
    p.add_argument("--quick", action="store_true", help="tiny CPU-friendly run")
    p.add_argument("--model", default=None, help="small-cnn | densenet121 (default by device)")
    p.add_argument("--images", type=int, default=None, help="synthetic images at the site")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--logical-batch", type=int, default=None)
    p.add_argument("--physical-batch", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def pick_device(choice: str, require_cuda: bool) -> torch.device:
    """CUDA when asked or available; `--require-cuda` without a GPU is a loud failure."""
    has_cuda = torch.cuda.is_available()
    if (require_cuda or choice == "cuda") and not has_cuda:
        raise SystemExit(
            "CUDA required but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda})"
        )
    if choice == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    return torch.device(choice)


def balanced_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Mean per-class recall: with skewed labels plain accuracy would flatter a constant guess."""
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(y), batch):
            preds.append(model(x[i : i + batch]).argmax(1))
    pred = torch.cat(preds)
    recalls = [float((pred[y == c] == c).float().mean()) for c in y.unique()]
    return float(np.mean(recalls))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one DP training round and write the JSON report; returns the report."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    device = pick_device(args.device, args.require_cuda)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    model_name = args.model or ("densenet121" if cuda and not args.quick else "small-cnn")
    n_images = args.images or (600 if args.quick else 20000)
    logical = args.logical_batch or (128 if args.quick else 512)
    physical = args.physical_batch or (32 if args.quick else 128)
    epochs = args.epochs or (1 if args.quick else 4)
    lr = args.lr or (0.2 if model_name == "small-cnn" else 0.05)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        (npz,) = generate_federation(
            Path(tmp), num_sites=1, image_size=args.image_size, sizes=[n_images], seed=args.seed
        )
        spec = ImageSpec(size=(args.image_size, args.image_size), classes=list(CLASSES))
        data = load_image_site({"format": "npz", "path": str(npz)}, spec)

    model = build_image_model(model_name, 1, len(CLASSES), args.image_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.train_x, data.train_y), batch_size=logical
    )
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=args.target_epsilon,
        target_delta=args.delta,
        epochs=epochs,
        max_grad_norm=args.max_grad_norm,
    )
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    acc_before = balanced_accuracy(model, test_x, test_y, physical)
    criterion = nn.CrossEntropyLoss()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    images = physical_steps = 0
    losses: list[float] = []
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer
        ) as memory_safe_loader:
            for x, y in memory_safe_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(x), y)
                loss.backward()
                optimizer.step()  # takes a real (noised) step only at logical-batch ends
                images += len(y)
                physical_steps += 1
                losses.append(float(loss.detach()))
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    acc_after = balanced_accuracy(model, test_x, test_y, physical)
    logical_steps = sum(steps for _, _, steps in engine.accountant.history)
    on_device = all(p.device.type == device.type for p in model.parameters())
    half = max(1, len(losses) // 4)
    report: dict[str, Any] = {
        "check": "gpu_dp_imaging_check",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if cuda
        else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "opacus": opacus.__version__,
        "cpu_count": os.cpu_count(),
        "model": model_name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_size": args.image_size,
        "train_images": len(data.train_y),
        "test_images": len(data.test_y),
        "epochs": epochs,
        "logical_batch": logical,
        "physical_batch": physical,
        "logical_steps": logical_steps,
        "physical_steps": physical_steps,
        "images_processed": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if cuda
        else None,
        "peak_rss_growth_mb_lower_bound": round(
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1
        ),
        "noise_multiplier": optimizer.noise_multiplier,
        "max_grad_norm": args.max_grad_norm,
        "sample_rate": 1 / len(loader),
        "target_epsilon": args.target_epsilon,
        "epsilon_spent": engine.get_epsilon(args.delta),
        "delta": args.delta,
        "loss_first_quarter": float(np.mean(losses[:half])),
        "loss_last_quarter": float(np.mean(losses[-half:])),
        "test_balanced_accuracy_before": acc_before,
        "test_balanced_accuracy_after": acc_after,
        "parameters_on_device": on_device,
    }
    ok = on_device and logical_steps > 0 and physical_steps >= logical_steps
    report["ok"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if not ok:
        raise SystemExit("DP training round did not run as expected; see the report above")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
