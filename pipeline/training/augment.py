"""Training augmentations whose landmark labels stay exact, batched in torch on the worker's device.

A training sample arrives as a *context crop*: the square the model would see (``crop_square`` of
the face box and margin) grown ``context`` times about its centre and resized to ``round(224 *
context)`` pixels, with its landmarks in ``[0, 1]`` units of that context crop
(``pipeline.stages.labels``). One affine map per sample takes every output pixel of the 224x224
model input to a point of the context crop; ``grid_sample`` resamples the image through it and the
inverse map moves the labels, so image and labels cannot drift apart. The map combines a horizontal
flip (with the iBUG 68-point index swap), a rotation about the crop centre, a scale and a shift.
Colour jitter and blur change pixels only.

Coordinates. Labels use the convention of the inference job: a model output ``u`` means source
pixel ``x0 + u * side``, with integer pixel coordinates at pixel centres, while the resampling works
in continuous coordinates where pixel ``i`` spans ``[i, i + 1)``. The geometry is therefore applied
to ``label + half a pixel`` and the half pixel is taken off again afterwards, which keeps a flipped
sample's labels on the same image content to a fraction of a pixel instead of one pixel off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.model.geometry import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE
from pipeline.training.config import AugmentConfig

# Index i of a mirrored face is index FLIP_PERMUTATION[i] of the original (iBUG 68 layout):
# jaw 0<->16 ..., brows 17<->26 ..., nose 31<->35 32<->34, eyes 36<->45 37<->44 38<->43 39<->42
# 40<->47 41<->46, mouth 48<->54 49<->53 50<->52 55<->59 56<->58 60<->64 61<->63 65<->67.
FLIP_PERMUTATION: tuple[int, ...] = (
    16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,  # jaw
    26, 25, 24, 23, 22, 21, 20, 19, 18, 17,  # brows
    27, 28, 29, 30,  # nose bridge: on the axis
    35, 34, 33, 32, 31,  # nose base
    45, 44, 43, 42, 47, 46,  # eye 36-41 -> the other eye
    39, 38, 37, 36, 41, 40,  # eye 42-47
    54, 53, 52, 51, 50, 49, 48,  # outer lip, top
    59, 58, 57, 56, 55,  # outer lip, bottom
    64, 63, 62, 61, 60,  # inner lip, top
    67, 66, 65,  # inner lip, bottom
)  # fmt: skip


def sample_params(n: int, cfg: AugmentConfig, generator: torch.Generator) -> dict:
    """Draw the random parameters of ``n`` samples (CPU tensors) from ``generator``."""

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator, dtype=torch.float64)

    j = cfg.colour_jitter
    blurred = torch.rand(n, generator=generator, dtype=torch.float64) < cfg.blur_prob
    return {
        "flip": torch.rand(n, generator=generator, dtype=torch.float64) < cfg.flip_prob,
        "angle": uniform(-1, 1) * math.radians(cfg.max_rotation),
        "scale": uniform(1 - cfg.max_scale, 1 + cfg.max_scale),
        "shift": uniform(-cfg.max_shift, cfg.max_shift, 2),
        "brightness": uniform(1 - j, 1 + j),
        "contrast": uniform(1 - j, 1 + j),
        "saturation": uniform(1 - j, 1 + j),
        "blur": torch.where(blurred, uniform(0.3, max(cfg.max_blur, 0.3)), 0.0),
    }


def output_to_context(params: dict, context: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample ``(M, t)``: output uv ``o`` maps to context-crop uv ``0.5 + t + M (o - 0.5)``."""
    cos, sin = torch.cos(params["angle"]), torch.sin(params["angle"])
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    mirror = torch.ones(len(cos), 2, dtype=torch.float64)
    mirror[params["flip"], 0] = -1.0
    m = rotation * mirror[:, None, :] * (params["scale"] / context)[:, None, None]
    return m, params["shift"] / context


def augment_batch(
    pixels: torch.Tensor,
    landmarks: torch.Tensor,
    pixel_uv: torch.Tensor,
    params: dict,
    context: float,
    size: int = INPUT_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp context crops into model inputs and move their labels along.

    ``pixels``: uint8 (N, S, S, 3) context crops; ``landmarks``: (N, 68, 2) in context-crop uv;
    ``pixel_uv``: (N,) one source pixel in context-crop uv (``1 / side``). Returns float images
    (N, 3, size, size) in [0, 1] on the pixels' device and float32 targets (N, 68, 2) in the
    output crop's uv, the unit of the model outputs.
    """
    device = pixels.device
    n = pixels.shape[0]
    m, t = output_to_context(params, context)
    theta = torch.cat([m, 2 * t[:, :, None]], dim=2)  # in grid_sample's [-1, 1] units
    grid = F.affine_grid(theta.float().to(device), [n, 3, size, size], align_corners=False)
    images = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    half = (0.5 * pixel_uv.double().cpu())[:, None, None]
    content = landmarks.double().cpu() + half - 0.5 - t[:, None, :]
    out = torch.linalg.solve(m[:, None], content[..., None])[..., 0] + 0.5
    out = out - half * context / params["scale"][:, None, None]
    flipped = params["flip"]
    if flipped.any():
        out[flipped] = out[flipped][:, list(FLIP_PERMUTATION)]
    return _colour_and_blur(images, params), out.float().to(device)


def _colour_and_blur(images: torch.Tensor, params: dict) -> torch.Tensor:
    device = images.device

    def column(name: str) -> torch.Tensor:
        return params[name].float().to(device)[:, None, None, None]

    images = images * column("brightness")
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * column("contrast") + mean
    grey = images * torch.tensor([0.299, 0.587, 0.114], device=device)[None, :, None, None]
    grey = grey.sum(1, keepdim=True)
    images = (images - grey) * column("saturation") + grey
    images = images.clamp_(0.0, 1.0)
    sigma = params["blur"].float()
    if bool((sigma > 0).any()):
        images = gaussian_blur(images, sigma.to(device))
    return images


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (pixels); sigma 0 leaves it unchanged."""
    n, c, h, w = images.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    safe = sigma.clamp(min=1e-3)[:, None]
    kernel = torch.exp(-0.5 * (x[None, :] / safe) ** 2)
    kernel = torch.where(sigma[:, None] > 0, kernel, (x[None, :] == 0).float())
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
    # One grouped convolution per axis blurs every channel of every image with its own kernel.
    flat = images.reshape(1, n * c, h, w)
    flat = F.conv2d(
        F.pad(flat, (radius, radius, 0, 0), mode="replicate"),
        kernel[:, None, None, :],
        groups=n * c,
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, radius, radius), mode="replicate"),
        kernel[:, None, :, None],
        groups=n * c,
    )
    return flat.reshape(n, c, h, w)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] NCHW -> ImageNet mean/std, as the inference predictor does."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std
