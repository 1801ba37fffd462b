"""What the model takes and gives (and where it runs), without importing torch: the read and commit
workers need these numbers, not the model (importing torch costs a worker ~1.5 s and ~400 MB)."""

INPUT_SIZE = 224  # the model sees 224x224 RGB crops
NUM_LANDMARKS = 68  # iBUG 68 points, (x, y) each
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INIT_CHOICES = ("random", "imagenet")  # a model without a weights file: how it is initialised
DEVICES = ("auto", "gpu", "cpu")  # where the jobs run the model (auto: a GPU when there is one)
OLD_DEVICES = {"cuda": "gpu"}  # the spelling of --device before December 2026, for one release


def torch_device(device: str) -> str:
    """torch's name of a ``--device`` value (``gpu`` is ``cuda``; ``auto`` stays)."""
    return "cuda" if device == "gpu" else device
DEFAULT_FACE_THRESHOLD = 0.72  # the face detector's score a face needs (pipeline.model.detector)
# Precision of the landmark model: auto (bf16 autocast on CUDA, fp32 on the CPU), bf16, fp32
# (pipeline.model.precision).
PRECISIONS = ("auto", "bf16", "fp32")
