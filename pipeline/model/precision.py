"""The numeric precision the models run in, decided in one place.

``--precision bf16`` runs the landmark model's backbone under bf16 autocast (its head stays in
fp32: ``network.Fp32Head``); ``fp32`` runs everything in fp32. The default (``auto``) is bf16 on
CUDA and fp32 on the CPU, where bf16 is only fast with AVX512-BF16 or AMX (on an AVX2-only CPU
VGG16 ran ~8x slower in bf16 than in fp32: docs/benchmarks.md); bf16 on the CPU is there to run
the GPU's arithmetic in the CPU tests.

Everything that runs in fp32 runs in IEEE fp32, not TF32: cuDNN convolutions may use TF32 by
default on Ampere and later GPUs, which made the face detector's scores (and so which faces pass
``--face-threshold``) differ between a CPU and a GPU, and the fp32 head of the landmark model
differ from its fp32 reference. ``use_ieee_fp32`` is called once in each process that runs a
model (a predictor actor, a fine-tuning worker, evaluation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config.errors import BadInput
from pipeline.model.geometry import PRECISIONS  # noqa: F401  (the choices, torch-free)

if TYPE_CHECKING:
    import torch


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; ``bf16`` / ``fp32`` as given. Needs no
    torch: the inference driver, which never imports it, decides this too."""
    if precision not in PRECISIONS:
        raise BadInput(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if str(device).split(":")[0] == "cuda" else "fp32"
    return precision


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast on ``device`` when ``precision`` is ``bf16`` (any device type); a no-op
    context for ``fp32``."""
    import torch

    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def channels_last(device: torch.device | str, precision: str) -> bool:
    """Whether the model and its inputs use channels_last: on CUDA (cuDNN's fast layout), and
    for bf16 on the CPU (oneDNN's bf16 convolutions ran ~6x faster in it here). fp32 on the CPU
    keeps the default layout, so it equals a plain forward pass."""
    import torch

    return torch.device(device).type == "cuda" or precision == "bf16"


def use_ieee_fp32() -> None:
    """fp32 convolutions and matmuls in IEEE fp32 (no TF32) in this process. The legacy flags are
    set (not ``fp32_precision``): setting the new API for cuDNN convolutions only makes reading
    ``torch.backends.cudnn.allow_tf32`` raise, and other code still reads it."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
