"""The inference job's settings: each one declared once, with its command-line help.

``InferConfig`` is the schema of ``landmarks infer`` (and of ``nightly``, which adds its dates):
the flags, the YAML config keys and their checks are derived from it (``pipeline.config.options``).
Free of torch and Ray, so parsing a command line stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config.options import above, at_least, check_declared, option, within
from pipeline.io.rows import SCHEMA_ID
from pipeline.io.shards import DEFAULT_FILES_PER_SHARD, DEFAULT_MAX_IMAGE_BYTES, FORMATS
from pipeline.io.storage import redact_values, storage_options_arg
from pipeline.model.geometry import DEVICES, INIT_CHOICES, OLD_DEVICES, PRECISIONS
from pipeline.stages.detect import (
    DEFAULT_FACE_THRESHOLD,
    DEFAULT_MAX_FACES,
    DEFAULT_MIN_FACE_SIZE,
    DETECT_MODES,
)
from pipeline.stages.preprocess import DEFAULT_MARGIN, DEFAULT_MAX_PIXELS
from pipeline.stages.reader import DECODE_MODES, DEFAULT_UNIT_BYTES
from pipeline.stages.units import DEFAULT_ROWS_PER_FILE

DEMO_DIR = "sample-data"  # where `landmarks infer` without --input writes and reads its demo
DECODES = ("auto", *DECODE_MODES)  # auto: gpu when the cluster is short of CPUs per GPU
# Batch sizes by device (the predictor's micro-batch); the team's design notes measured the model
# on an H100 at batch 512 in bf16 eager (7,923 images/s) and 256 compiled (13,618). On CPU the
# batch is mostly latency: on 2 cores VGG16 ran 1.84 / 1.94 / 2.08 images/s at batch 8 / 16 /
# 64, so 16 gives results (and progress) 4x sooner than 64 for 7 % less throughput.
DEFAULT_BATCH_SIZE = {"cuda": 512, "cuda+compile": 256, "cpu": 16}
# Rows per unit (one predictor call). The driver pays ~7-10 ms of CPU per unit (measured on a
# simulated 5-node cluster, jobs/benchmark_scale.py), so on a GPU a unit is 4,096 rows (~0.5 s
# of an H100, ~200 MB of 640x480 JPEG bytes; units also stop at 256 MB): ~2 s of driver CPU per
# million rows. On CPU, 4 batches: results (and progress) every ~30 s of a 2-core machine.
GPU_UNIT_ROWS = 4096
UNIT_BATCHES = 4
IO, MODEL, PRE, FACES, RUN = ("input and output", "model", "preprocessing", "face detection",
                              "execution")


@dataclass(frozen=True)
class InferConfig:
    """Everything the inference job needs; the command line is derived from it."""

    input: str = option(
        "shards: a file, folder/prefix or glob at any fsspec URI (local path, s3://, gs://). "
        "Omitted: generate and use a sample archive", group=IO)
    output: str = option(
        "folder/prefix for part-<shard>.parquet files (default with the sample archive: "
        f"{DEMO_DIR}/landmarks)", group=IO)
    format: str = option("shard layout (default: from the file extensions)", default="auto",
                         choices=FORMATS, group=IO)
    image_column: str = option("Parquet: image bytes column", default="image", group=IO)
    key_column: str = option("Parquet: sample key column", default="key", group=IO)
    files_per_shard: int = option("loose images: files per output file",
                                  default=DEFAULT_FILES_PER_SHARD, bounds=at_least(1), group=IO)
    storage_options: Mapping[str, Any] = option(
        'fsspec options as JSON, e.g. \'{"endpoint_url": "http://..."}\', or @file.json; per '
        'store: \'{"s3": {...}, "gs": {...}}\'. AWS_ENDPOINT_URL, AWS_PROFILE and AWS_REGION '
        "are read too", default_factory=dict, parse=storage_options_arg, group=IO, repr=False)

    weights: str | None = option("model file URI (pipeline.model format)", default=None,
                                 group=MODEL)
    init: str = option("without --weights: random, or ImageNet features (downloads once)",
                       default="random", choices=INIT_CHOICES, group=MODEL)
    seed: int = option("seed of random init", default=0, group=MODEL)

    margin: float = option("grow the sidecar bbox by this fraction per side",
                           default=DEFAULT_MARGIN, bounds=within(0, 2), group=PRE)
    max_pixels: int = option("refuse images above this many pixels, before decoding them",
                             default=DEFAULT_MAX_PIXELS, bounds=at_least(1), group=PRE)
    max_image_bytes: int = option(
        "tar members above this many bytes are too_large rows, skipped without being read",
        default=DEFAULT_MAX_IMAGE_BYTES, bounds=at_least(1), group=PRE)

    detect: str = option(
        "find faces with the face detector (RetinaFace) and give each its own row: auto (in "
        "samples without a sidecar bbox; a sidecar box wins), always (every image; sidecar boxes "
        "ignored), never (crop the sidecar box or the centred square). Faces are found where "
        "the image is decoded: in the read tasks (--decode cpu) or the predictors (gpu)",
        default="auto",
        choices=DETECT_MODES, group=FACES)
    max_faces: int = option("at most this many faces per image, the best scoring",
                            default=DEFAULT_MAX_FACES, bounds=at_least(1), group=FACES)
    min_face_size: float = option(
        "ignore faces whose detector box is smaller than this many image pixels on its shorter "
        "side", default=DEFAULT_MIN_FACE_SIZE, bounds=at_least(0), group=FACES)
    face_threshold: float = option(
        "detector score a face needs, in (0, 1)", default=DEFAULT_FACE_THRESHOLD,
        bounds=within(0, 1, lo_open=True, hi_open=True), group=FACES)

    batch_size: int | None = option(
        f"model batch size (default: {DEFAULT_BATCH_SIZE['cuda']} on GPU, "
        f"{DEFAULT_BATCH_SIZE['cuda+compile']} with --compile, {DEFAULT_BATCH_SIZE['cpu']} on "
        "CPU); on GPU out-of-memory the actor halves it and goes on", default=None,
        bounds=at_least(1), group=RUN)
    unit_rows: int | None = option(
        f"rows per work unit, the rows one predictor call gets (default: {GPU_UNIT_ROWS} on GPU, "
        f"{UNIT_BATCHES} batches on CPU; units also stop at {DEFAULT_UNIT_BYTES >> 20} MB); small "
        "shards are bundled up to it, big ones sliced",
        default=None, bounds=at_least(1), group=RUN)
    unit_bytes: int = option(default=DEFAULT_UNIT_BYTES, cli=False, bounds=at_least(1))
    rows_per_file: int = option(
        "a shard with more rows is written as several files, part-<shard>.parquet then "
        "part-<shard>.c00001.parquet ...", default=DEFAULT_ROWS_PER_FILE, bounds=at_least(1),
        group=RUN)
    num_predictors: int | None = option(
        "predictor actors (default: one per GPU, or 1 on CPU); on GPUs at most the cluster's "
        "GPUs / --gpus-per-predictor", default=None, bounds=at_least(1), group=RUN)
    gpus_per_predictor: float = option(
        "GPUs each predictor actor reserves, in (0, 1]: 0.5 puts two actors (two models) on "
        "each GPU; one actor runs one model on one GPU", default=1.0,
        bounds=within(0, 1, lo_open=True), group=RUN)
    cpus_per_predictor: float | None = option(
        "CPUs per predictor actor (default: 1 with GPUs, else all but one)", default=None,
        bounds=above(0), group=RUN,
        formerly=("predictor_cpus",))
    device: str = option("auto: GPU actors when the cluster has GPUs", default="auto",
                         choices=DEVICES,
                         old_values=OLD_DEVICES, group=RUN)
    precision: str = option(
        "the landmark model's arithmetic: bf16 (autocast for the backbone, the head in fp32) "
        "or fp32; auto: bf16 on GPUs, fp32 on CPUs (bf16 on a CPU is only fast with AMX or "
        "AVX512-BF16)", default="auto", choices=PRECISIONS, group=RUN)
    decode: str = option(
        "where images are decoded, cropped and resized: cpu (PIL in the read tasks), gpu "
        "(nvJPEG in the predictor actors; non-JPEG images fall back to the CPU per sample), auto "
        "(gpu when the cluster has fewer than ~50 CPUs per GPU, the cores it takes to keep one "
        "H100 fed)", default="auto", choices=DECODES, group=RUN)
    compile: bool = option(
        "torch.compile the model in each actor (faster steady state on GPU, ~1 min of compiling "
        "at start; off by default)", default=False, group=RUN)
    calls_per_predictor: int | None = option(
        "batches each predictor actor works on at once (default: 2 on GPU, so copies and host "
        "work overlap the GPU's compute; 1 on CPU)", default=None, bounds=at_least(1),
        group=RUN, formerly=("predictor_concurrency",))
    ray_address: str | None = option("Ray cluster (default: RAY_ADDRESS, else local Ray)",
                                     default=None, group=RUN)
    force: bool = option(
        "redo every shard, even those an earlier run completed with the same model and "
        "settings (default: skip them)", default=False, group=RUN)
    break_lease: bool = option(
        "take over the output's lease from a run that died (its record, OUTPUT/_lease.json, "
        "names it); a live run keeps its lease otherwise, and this job stops with exit 2",
        default=False, group=RUN)
    stall_timeout: float = option(
        "stop the job when no unit has been predicted or committed (nor input read) for this "
        "many seconds: the log says what each stage holds, the exit status is 1, and a rerun "
        "resumes", default=900.0, bounds=above(0), group=RUN)
    max_error_fraction: float = option(
        "exit with status 1 when more than this share of the samples have errors; a shard "
        "that stops part-way always does", default=0.01, bounds=within(0, 1), group=RUN)
    gpu_hour_price: float | None = option(
        "price of one GPU hour (any currency): the manifest, run report and ledger then give "
        "the GPU cost of the run and per million rows, beside the GPU- and CPU-seconds they "
        "always give", default=None, bounds=at_least(0), group=RUN)

    def __post_init__(self):
        check_declared(self)  # choices and ranges, as declared with each option

    def result_settings(self) -> dict[str, Any]:
        """What besides input and model decides the output files (for resume): the settings
        that change the rows, and the columns (a release that changes them rewrites files)."""
        return {"columns": SCHEMA_ID, "format": self.format, "image_column": self.image_column,
                "key_column": self.key_column, "files_per_shard": self.files_per_shard,
                "rows_per_file": self.rows_per_file, "margin": self.margin,
                "max_pixels": self.max_pixels, "detect": self.detect,
                "max_faces": self.max_faces, "min_face_size": self.min_face_size,
                "face_threshold": self.face_threshold}

    def public_dict(self) -> dict[str, Any]:
        """The config without secrets: storage option values are left out."""
        data = redact_values(asdict(self))  # URL passwords and presigned query strings
        data["storage_options"] = sorted(self.storage_options)
        return data
