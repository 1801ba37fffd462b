"""The VGG16 keypoint model and its model file.

Architecture (README.md, "Model and model file"): torchvision ``vgg16`` whose ``features`` are
unchanged (so the ImageNet weights load as they are), ``avgpool`` replaced by
``Conv2d(512, 512, 3) -> MaxPool2d(2) -> Flatten()`` and ``classifier`` by
``Linear(2048, 512) -> ReLU -> Dropout(0.5) -> Linear(512, 136) -> Sigmoid``. Output: 68 iBUG
points, ``x`` then ``y`` per point, in [0, 1] of the input crop.

Precision: under autocast (bf16 on a GPU, or on a CPU with ``--precision bf16``) the backbone
runs in bf16 but the head (``avgpool`` and ``classifier``) always runs in fp32 (``Fp32Head``):
a bf16 ``Linear -> Sigmoid`` gives outputs >= 0.5 in steps of 1/256 of the crop side (2 px on a
500 px crop), in inference, training and validation alike. The head is ~1 % of the model's work.

Model file: one ``torch.save`` of a plain dict (loadable with ``weights_only=True``)::

    {"format": "face-landmarks-model", "format_version": 1,
     "arch": "vgg16-keypoints-68", "input_size": 224, "landmark_scheme": "ibug68",
     "version": "<sha256 of the weights' bytes, 16 hex digits>",
     "metadata": {...free-form, e.g. training run...},
     "state_dict": {...}}
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pipeline.config.errors import BadInput
from pipeline.io.storage import read_bytes, write_bytes
from pipeline.model.geometry import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    INIT_CHOICES,
    INPUT_SIZE,
    NUM_LANDMARKS,
)
from pipeline.model.identity import (  # noqa: F401
    ARCH,
    FILE_FORMAT,
    FILE_FORMAT_VERSION,
    LANDMARK_SCHEME,
    ModelInfo,
    check_header,
    init_source,
    init_version,
)


class Fp32Head(nn.Sequential):
    """An ``nn.Sequential`` that runs in fp32 even under autocast: its input is cast to fp32 and
    autocast is off inside it. Its parameters and state-dict keys are a plain Sequential's, so
    model files load either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def build_model() -> nn.Module:
    """The keypoint network with random weights (torchvision's own init for ``features``)."""
    from torchvision.models import vgg16

    model = vgg16(weights=None)
    model.avgpool = Fp32Head(nn.Conv2d(512, 512, 3), nn.MaxPool2d(2), nn.Flatten())
    model.classifier = Fp32Head(
        nn.Linear(2048, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(512, 2 * NUM_LANDMARKS),
        nn.Sigmoid(),
    )
    return model


def load_imagenet_features(model: nn.Module) -> None:
    """Copy torchvision's ImageNet VGG16 weights into ``model.features``.

    Uses the real ``VGG16_Weights.IMAGENET1K_V1`` path: the first call downloads the weights
    (needs network) into the torch hub cache; later calls read the cache.
    """
    from torchvision.models import VGG16_Weights

    state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    model.features.load_state_dict(features)


def weights_version(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A stable id of the weights: sha256 over the names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def save_model(
    model: nn.Module,
    uri: str,
    metadata: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``model`` as a model file at any fsspec URI; returns the weights' version id."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    version = weights_version(state)
    payload = {
        "format": FILE_FORMAT,
        "format_version": FILE_FORMAT_VERSION,
        "arch": ARCH,
        "input_size": INPUT_SIZE,
        "landmark_scheme": LANDMARK_SCHEME,
        "version": version,
        "metadata": dict(metadata or {}),
        "state_dict": state,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    # One write of the finished bytes: an object store commits it as a single PUT, so a reader
    # never sees half a model file.
    write_bytes(uri, buffer.getvalue(), storage_options)
    return version


def read_model_file(uri: str, storage_options: Mapping[str, Any] | None = None,
                    data: bytes | None = None) -> dict[str, Any]:
    """Read and validate a model file (``data``: its bytes, read once elsewhere; ``uri`` then
    only names it); raises ``ValueError`` saying what is wrong."""
    try:
        raw = data if data is not None else read_bytes(uri, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file not found: {uri}") from None
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInput(f"{uri} is not a readable model file ({exc.__class__.__name__})") from exc
    check_header(payload, uri)
    return payload


def load_model(
    weights: str | None = None,
    init: str = "random",
    storage_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    data: bytes | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Build the model in eval mode from a model file URI (or ``data``, the file's bytes as the
    run read them once), or from ``init`` when none is given.

    ``init="random"`` seeds torch with ``seed`` so every actor builds the same weights;
    ``init="imagenet"`` loads torchvision's ImageNet weights into ``features``.
    """
    if weights:
        payload = read_model_file(weights, storage_options, data)
        model = build_model()
        try:
            model.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
            detail = " ".join(line.strip() for line in str(exc).splitlines()[:3])
            raise BadInput(f"{weights}: the weights do not fit the {ARCH} model: {detail}"
                             ) from None
        version = weights_version(model.state_dict())
        if payload.get("version") != version:
            raise BadInput(f"{weights}: weights hash to {version} but the file says "
                             f"{payload.get('version')!r}: the file is damaged or was edited")
        info = ModelInfo(version, weights, dict(payload.get("metadata") or {}))
    else:
        if init not in INIT_CHOICES:
            raise BadInput(f"init must be one of {INIT_CHOICES}, got {init!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model()
        if init == "imagenet":
            load_imagenet_features(model)
        # Identified by what built it (pipeline.model.identity), so the driver knows the
        # version without building the model.
        info = ModelInfo(init_version(init, seed), init_source(init, seed))
    model.eval()
    return model, info
