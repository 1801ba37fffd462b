"""Which model a run uses, without importing torch or building the network.

The driver of an inference run needs the model's version (resume checks, completion records,
the manifest) but never the model: only the predictor actors run it. Importing torch costs a
process ~450 MB of resident memory and ~3 s, and building the VGG16 another ~600 MB while
torchvision's own classifier exists, so the driver reads only what it needs:

- a model file (``pipeline.model.network.save_model``) is a ``torch.save`` zip archive; its
  header (format, architecture, version, metadata) is in the archive's ``data.pkl``, which is
  unpickled here with every tensor left out. An inference run reads the file's bytes once
  (``pipeline.inference.job``), takes its version from them and gives every predictor actor
  those same bytes (one copy in Ray's object store per node), never the URI: a file replaced
  during the run changes nothing in it, not even in an actor that starts or restarts late. The
  actors check that the weights hash to the declared version, and that it is the version the
  driver recorded (``check_loaded``), or the run stops.
- a model without a file (``--init random|imagenet``) is identified by what determines its
  weights: the architecture, the init, the seed, the ImageNet weights' URL (it names their
  hash) and the torch and torchvision releases that build it.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata as _metadata
from typing import Any

from pipeline.config.errors import BadInput, JobFailed
from pipeline.model.geometry import INIT_CHOICES, INPUT_SIZE

ARCH = "vgg16-keypoints-68"
LANDMARK_SCHEME = "ibug68"
FILE_FORMAT = "face-landmarks-model"
FILE_FORMAT_VERSION = 1
# torchvision's VGG16_Weights.IMAGENET1K_V1.url: the file name carries the weights' hash.
IMAGENET_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


@dataclass(frozen=True)
class ModelInfo:
    """What the inference job records about the model it ran."""

    version: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


class ModelChanged(JobFailed):
    """An actor loaded another model than the one the run recorded: stop the run."""


def init_source(init: str, seed: int) -> str:
    return f"init:{init}" + (f":seed={seed}" if init == "random" else "")


def init_version(init: str, seed: int) -> str:
    """The version of a model built from ``init`` with ``seed`` (no model file): 16 hex digits
    of a sha256 over what determines its weights."""
    if init not in INIT_CHOICES:
        raise BadInput(f"init must be one of {INIT_CHOICES}, got {init!r}")
    releases = "|".join(f"{name}={_release(name)}" for name in ("torch", "torchvision"))
    source = IMAGENET_URL if init == "imagenet" else "random"
    text = f"{ARCH}|init={init}|{source}|seed={seed}|{releases}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _release(package: str) -> str:
    try:
        return _metadata.version(package)
    except _metadata.PackageNotFoundError:
        return "absent"


def check_header(payload: Mapping[str, Any], uri: str) -> None:
    """Raise ``ValueError`` saying what is wrong with a model file's header fields."""
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise BadInput(
            f"{uri} is not a {FILE_FORMAT} file; write one with pipeline.model.network.save_model"
        )
    if not isinstance(payload.get("format_version"), int):
        raise BadInput(f"{uri}: format_version must be an integer, got "
                         f"{payload.get('format_version')!r}")
    if payload["format_version"] > FILE_FORMAT_VERSION:
        raise BadInput(
            f"{uri} has format_version {payload['format_version']}; this code reads up to "
            f"{FILE_FORMAT_VERSION}: upgrade the pipeline"
        )
    for key, expected in (("arch", ARCH), ("input_size", INPUT_SIZE),
                          ("landmark_scheme", LANDMARK_SCHEME)):
        if payload.get(key) != expected:
            raise BadInput(f"{uri}: {key} is {payload.get(key)!r}, expected {expected!r}")
    if not isinstance(payload.get("state_dict"), dict):
        raise BadInput(f"{uri} has no state_dict")
    version = payload.get("version")
    if not (isinstance(version, str) and len(version) == 16
            and all(c in "0123456789abcdef" for c in version)):
        raise BadInput(f"{uri}: version must be 16 hex digits, got {version!r}")


class _Tensor:
    """Where a tensor was in the pickle (never its data)."""


def _placeholder(*args, **kwargs) -> _Tensor:
    return _Tensor()


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save`` archive's ``data.pkl`` without torch: tensors and storages
    become placeholders; any other class is refused (nothing is imported or run)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module in ("torch", "torch._utils", "torch.storage") and (
                name.startswith("_rebuild") or name.endswith("Storage")
                or name in ("Size", "device") or name.startswith(("float", "bfloat", "int"))):
            return _placeholder
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a model file")

    def persistent_load(self, pid):
        return _Tensor()


def read_header(uri: str, storage_options: Mapping[str, Any] | None = None,
                data: bytes | None = None) -> dict[str, Any]:
    """A model file's header (every field but the tensors), read without torch: only the
    archive's index and its ``data.pkl`` are fetched (or parsed from ``data``, the file's
    bytes). Raises ``FileNotFoundError`` or ``ValueError`` saying what is wrong."""
    from pipeline.io.storage import filesystem, retry

    def open_file():
        if data is not None:
            return io.BytesIO(data)
        fs, path = filesystem(uri, storage_options)
        return fs.open(path, "rb")

    def read() -> dict[str, Any]:
        with open_file() as f:
            try:
                with zipfile.ZipFile(f) as archive:
                    names = [n for n in archive.namelist() if n.endswith("/data.pkl")
                             or n == "data.pkl"]
                    if len(names) != 1:
                        raise ValueError("no data.pkl")
                    with archive.open(names[0]) as pkl:
                        return _HeaderUnpickler(pkl).load()
            except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, EOFError,
                    TypeError, AttributeError, IndexError, KeyError) as exc:
                raise BadInput(
                    f"{uri} is not a readable model file ({exc.__class__.__name__})") from exc

    try:
        payload = retry(read, uri, "read")
    except FileNotFoundError:
        raise FileNotFoundError(f"model file not found: {uri}") from None
    check_header(payload, uri)
    return payload


def model_identity(weights: str | None = None, init: str = "random",
                   storage_options: Mapping[str, Any] | None = None, seed: int = 0,
                   data: bytes | None = None) -> ModelInfo:
    """The ``ModelInfo`` that ``pipeline.model.network.load_model`` gives for the same
    arguments, without torch: a bad file or init fails here as it would there (a file whose
    weights do not fit the network fails in the actors, which load them)."""
    if weights:
        header = read_header(weights, storage_options, data)
        return ModelInfo(header["version"], weights, dict(header.get("metadata") or {}))
    return ModelInfo(init_version(init, seed), init_source(init, seed))


def check_loaded(info: ModelInfo, expected: str | None) -> None:
    """In an actor: the model it loaded is the version the run recorded, or the run stops."""
    if expected and info.version != expected:
        raise ModelChanged(
            f"the model loaded from {info.source} is version {info.version}, but this run "
            f"started with version {expected}: the weights changed during the run (or this "
            "node builds the model with other torch/torchvision releases). Rerun: the run "
            "resumes with the model as it is now")
