"""The parts of fine-tuning that do not need Ray: loss, optimiser, checkpoint state, one epoch of
training and one of validation over any iterable of batches.

``pipeline.backend.trainer`` runs them inside Ray Train workers (batches from Ray Data shards,
gradients synchronised by DDP, sums all-reduced across workers); tests can call them directly. A
training batch holds ``pixels`` uint8 (N, S, S, 3) context crops, ``landmarks`` (N, 68, 2) in crop
units and ``pixel_uv`` (N,), as ``pipeline.stages.labels.LabelledReader`` writes them; a validation
batch holds the 224x224 inference crop (context 1) and ``key_hash``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.errors import BadInput
from pipeline.model.metrics import DEFAULT_THRESHOLD, REGIONS
from pipeline.model.network import INPUT_SIZE, NUM_LANDMARKS
from pipeline.model.precision import autocast, channels_last
from pipeline.training.augment import augment_batch, normalize_images, sample_params
from pipeline.training.config import LOSSES, SCHEDULES, AugmentConfig

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"  # the TrainState alone, small enough to read without the weights
WING_W, WING_EPS = 10.0, 2.0  # Feng et al. 2018, in pixels of the 224x224 input


def landmark_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss over all coordinates, measured in pixels of the 224x224 model input."""
    diff = (pred.float() - target.float()) * INPUT_SIZE
    if kind == "l1":
        return diff.abs().mean()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(diff, torch.zeros_like(diff), beta=1.0)
    if kind == "wing":
        a = diff.abs()
        c = WING_W - WING_W * math.log(1 + WING_W / WING_EPS)
        return torch.where(a < WING_W, WING_W * torch.log1p(a / WING_EPS), a - c).mean()
    raise BadInput(f"loss must be one of {LOSSES}, got {kind!r}")


def freeze_features(model: nn.Module, freeze: bool) -> None:
    """Stop (or allow) gradients into the backbone. Call before wrapping the model in DDP, which
    registers the parameters that need gradients once, when it is built."""
    for p in model.features.parameters():
        p.requires_grad_(not freeze)


def build_optimizer(
    model: nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW; the backbone (``features``) at ``lr * backbone_lr_mult`` unless it is frozen."""
    head = [p for n, p in model.named_parameters() if not n.startswith("features.")]
    groups = [{"params": head, "lr": lr}]
    backbone = [p for p in model.features.parameters() if p.requires_grad]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_mult})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, epochs: int):
    """Per-epoch learning-rate schedule: cosine decay to 1 % over ``epochs``, or constant."""
    if kind not in SCHEDULES:
        raise BadInput(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=0.0)


@dataclass
class TrainState:
    """Progress that a checkpoint carries besides weights and optimiser."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken (per worker; all workers take the same number)
    best_nme: float = float("inf")
    history: list[dict[str, float]] = field(default_factory=list)


def save_state(directory: str, model: nn.Module, optimizer, scheduler, state: TrainState) -> None:
    """Write ``state.pt`` (plain tensors and numbers: loadable with ``weights_only=True``)."""
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": asdict(state),
    }
    torch.save(payload, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, PROGRESS_FILE), "w") as f:
        json.dump(asdict(state), f)


def load_state(directory: str) -> dict[str, Any]:
    """Read what ``save_state`` wrote."""
    with open(os.path.join(directory, STATE_FILE), "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def optimizer_digest(state_dict: dict) -> str:
    """A short fingerprint of an optimiser's state: equal digests mean equal moments and steps."""
    digest = hashlib.sha256()
    for index in sorted(state_dict["state"]):
        for name in sorted(state_dict["state"][index]):
            value = state_dict["state"][index][name]
            tensor = value.detach().cpu().float() if torch.is_tensor(value) else torch.tensor(value)
            digest.update(f"{index}|{name}|".encode() + tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The augmentation draws of one step: reproducible, different on every worker and step."""
    value = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    return torch.Generator().manual_seed(value)


@contextlib.contextmanager
def no_cudnn_benchmark():
    """cuDNN's autotuner off inside: each rank validates its own share of every batch, so the
    batch sizes vary, and with ``cudnn.benchmark`` on every new size would be tuned again."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    augment: AugmentConfig,
    context: float,
    loss_kind: str,
    device: torch.device,
    seed: int,
    rank: int,
    first_step: int,
    after_step: Callable[[int], None] | None = None,
    precision: str = "fp32",
) -> tuple[float, int, int]:
    """One pass over ``batches``; returns ``(sum of batch losses, images, steps)``. With
    ``precision="bf16"`` the forward pass runs under bf16 autocast (the head in fp32, so the
    loss sees unrounded outputs)."""
    model.train()
    loss_sum, images, step = 0.0, 0, first_step
    for batch in batches:
        pixels = batch["pixels"].to(device, non_blocking=True)
        params = sample_params(len(pixels), augment, step_generator(seed, rank, step))
        x, target = augment_batch(pixels, batch["landmarks"], batch["pixel_uv"], params, context)
        x = normalize_images(x)
        if channels_last(device, precision):
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            out = model(x)
        loss = landmark_loss(out.float().view(-1, NUM_LANDMARKS, 2), target, loss_kind)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        loss_sum, images = loss_sum + float(loss.detach()), images + len(pixels)
        if after_step is not None:
            after_step(step)
    return loss_sum, images, step - first_step


# Validation sums, all-reduced across workers: count, NME, failures, AUC term, then regions.
VAL_FIELDS = ("count", "nme", "failures", "auc") + tuple(f"nme_{r}" for r in REGIONS)


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    threshold: float = DEFAULT_THRESHOLD,
    precision: str = "fp32",
) -> torch.Tensor:
    """Sums over this worker's share of the validation rows (``key_hash % world == rank``), in
    the order of ``VAL_FIELDS``; float64 on ``device`` so they can be all-reduced. The points
    come from the fp32 head whatever ``precision`` the backbone runs in, and the errors are
    computed in float64."""
    model.eval()
    sums = torch.zeros(len(VAL_FIELDS), dtype=torch.float64)
    with no_cudnn_benchmark():
        for batch in batches:
            _validate_batch(model, batch, sums, device, rank, world, threshold, precision)
    return sums.to(device)


def _validate_batch(model, batch, sums, device, rank, world, threshold, precision) -> None:
    """Add one batch's share of this worker to ``sums``."""
    from pipeline.model.metrics import point_errors

    mine = (batch["key_hash"].cpu() % world) == rank
    if not bool(mine.any()):
        return
    pixels = batch["pixels"][mine.to(batch["pixels"].device)].to(device)
    x = normalize_images(pixels.permute(0, 3, 1, 2).float().div_(255.0))
    if channels_last(device, precision):
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        out = model(x)
    pred = out.float().view(-1, NUM_LANDMARKS, 2).cpu().numpy()
    errors = point_errors(pred, batch["landmarks"][mine.to(batch["landmarks"].device)].cpu())
    nmes = errors.mean(1)
    regions = [errors[:, a:b].mean(1).sum() for a, b in REGIONS.values()]
    sums += torch.tensor(
        [
            len(nmes),
            nmes.sum(),
            (nmes > threshold).sum(),
            np.clip(threshold - nmes, 0, None).sum() / threshold,
            *regions,
        ],
        dtype=torch.float64,
    )


def validation_metrics(sums: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """All-reduced ``validate`` sums -> ``val_nme``, failure rate, AUC and NME per region."""
    values = dict(zip(VAL_FIELDS, sums.cpu().tolist(), strict=True))
    count = values.pop("count")
    if count == 0:
        raise BadInput("the validation set is empty: raise --val-fraction or pass --val-input")
    metrics = {"val_samples": int(count)}
    for name, total in values.items():
        key = {"failures": f"val_failure_rate@{threshold:g}", "auc": f"val_auc@{threshold:g}"}.get(
            name, f"val_{name}"
        )
        metrics[key] = total / count
    return metrics
