"""The evaluation job's settings; the ``evaluate`` command line is derived from them."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.errors import BadInput
from pipeline.config.options import above, at_least, check_declared, option, within
from pipeline.model.geometry import DEVICES, OLD_DEVICES, PRECISIONS
from pipeline.model.metrics import DEFAULT_THRESHOLD
from pipeline.stages.detect import DEFAULT_FACE_THRESHOLD, DETECT_MODES
from pipeline.stages.labels import SPLITS
from pipeline.training.config import LabelledData


@dataclass(frozen=True, kw_only=True)
class EvalConfig(LabelledData):
    """What to evaluate against which labels."""

    labels: str = option("labelled shards, any fsspec URI")
    weights: str | None = option("model file to run on the labelled crops", default=None,
                                 exclusive="source")
    predictions: str | None = option("Parquet output of the inference job", default=None,
                                     exclusive="source")
    report: str = option("the report's JSON file, any fsspec URI (its page and CED plot go "
                         "beside it)", formerly=("output",))
    ced: str | None = option("CED plot PNG URI (default: the report path with .png)",
                             default=None)
    split: str = option(
        "score only the hash split of the fine-tuning job (with --val-fraction)", default="all",
        choices=SPLITS)
    threshold: float = option("failure / AUC threshold (NME)", default=DEFAULT_THRESHOLD,
                              bounds=above(0))
    detect: str = option(
        "with --weights: never (crop the labelled face box, the landmark model alone) or always "
        "(find the faces in each labelled image with the face detector, as the inference job "
        "does, and score the one that overlaps the labelled face; a labelled face found nowhere "
        "counts as a failure); auto, as in infer, searches only images without a face box, and "
        "every labelled face has one (from its landmarks): the same as never",
        default="never", choices=DETECT_MODES)
    face_threshold: float = option(
        "with --detect always: the detector score a face needs, in (0, 1), as in infer",
        default=DEFAULT_FACE_THRESHOLD, bounds=within(0, 1, lo_open=True, hi_open=True))
    batch_size: int = option("crops per model call", default=32, bounds=at_least(1))
    device: str = option("auto: a GPU when there is one", default="auto", choices=DEVICES,
                         old_values=OLD_DEVICES)
    precision: str = option(
        "with --weights: bf16 (autocast for the backbone, the head in fp32) or fp32; auto: bf16 "
        "on a GPU, fp32 on the CPU (the inference job's default)", default="auto",
        choices=PRECISIONS)
    worst: int = option(default=10, cli=False, bounds=at_least(0))

    def __post_init__(self):
        if (self.weights is None) == (self.predictions is None):
            raise BadInput(
                "give exactly one of --weights (a model file) or --predictions "
                "(the inference job's Parquet output)"
            )
        check_declared(self)  # choices and ranges, as declared with each option
        if self.split != "all" and not 0 < self.val_fraction < 1:
            raise BadInput(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.detect == "always" and self.weights is None:
            raise BadInput("--detect always runs the detector and the model: give --weights "
                             "(Parquet predictions of a run with --detect are matched by "
                             "overlap anyway)")

    @property
    def ced_uri(self) -> str:
        return self.ced or (self.report.rsplit(".", 1)[0] + ".png")
