"""The face detector's cost, next to the landmark model's, per image.

    python jobs/benchmark_detect.py                  # CPU, one thread: images/s per core
    python jobs/benchmark_detect.py --device cuda    # GPU: batches of --batch images

Inputs: the two real photos in tests/data (a 150x225 portrait, a 1920x1080 photo with two
people) and a 640x480 synthetic face. For each, seconds per image of

1. detection: ``pipeline.model.detector.detect`` (scale to <= 640 px, forward, decode, NMS), on
   the decoded image (decoding is the read task's either way);
2. detection as the read stage does it: ``FaceFinder`` (detection + each face's crop cut from
   the full-resolution image and resized to 224x224) (CPU only);
3. the landmark model alone on one 224x224 crop per face found (the predictor's work for that
   image), through ``pipeline.stages.runner.ModelRunner`` as the job runs it;

and detection's share of the two: detection / (detection + landmark model). On CUDA both run in
batches of ``--batch`` images (the detector pads a batch to its largest image), timed after
warm-up with ``torch.cuda.synchronize``. Writes ``--out`` (default
benchmark-results/detect-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo.synthetic import render_face  # noqa: E402
from pipeline.model.network import load_model  # noqa: E402
from pipeline.stages.preprocess import decode_image  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def images() -> dict:
    synthetic, _, _ = render_face(np.random.default_rng(0), (640, 480))
    return {
        "portrait 150x225 (takeo)": decode_image((DATA / "takeo.ppm").read_bytes()),
        "photo 1920x1080, 2 people (breakingbad)": decode_image(
            (DATA / "breakingbad.jpg").read_bytes()),
        "synthetic 640x480": synthetic.convert("RGB"),
    }


def timed(fn, repeats: int, sync=lambda: None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: per core)")
    p.add_argument("--batch", type=int, default=64, help="images per batch on CUDA")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from pipeline.model.detector import detect, load_detector
    from pipeline.stages.detect import FaceFinder
    from pipeline.stages.runner import ModelRunner

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    detector = load_detector(device)
    model, _ = load_model(init="random", seed=0)
    runner = ModelRunner(model, device, micro_batch=args.batch if cuda else 16)
    n = args.batch if cuda else 1
    results = {}
    for name, image in images().items():
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).to(device)
        batch = [pixels] * n
        faces = len(detect(detector, [pixels])[0])
        detect_s = timed(lambda b=batch: detect(detector, b), args.repeats, sync) / n
        crops = np.random.default_rng(0).integers(0, 256, (max(faces, 1) * n, 224, 224, 3),
                                                  dtype=np.uint8)
        landmark_s = timed(lambda c=crops: runner.run(c), args.repeats, sync) / n
        row = {"faces": faces, "detect_s": round(detect_s, 5),
               "detect_images_per_s": round(1 / detect_s, 1),
               "landmarks_s": round(landmark_s, 5),
               "detect_share": round(detect_s / (detect_s + landmark_s), 3)}
        if not cuda:
            finder = FaceFinder()
            row["read_stage_s"] = round(timed(lambda im=image, f=finder: f(im), args.repeats), 5)
        results[name] = row
        print(f"{name}: {faces} face(s), detection {1000 * detect_s:.1f} ms "
              f"({row['detect_images_per_s']} images/s), landmark model "
              f"{1000 * landmark_s:.1f} ms, detection's share {100 * row['detect_share']:.0f} %"
              + (f", read stage (detection + crops) {1000 * row['read_stage_s']:.1f} ms"
                 if "read_stage_s" in row else ""))
    report = {"device": str(device), "threads": args.threads if not cuda else None,
              "batch": n, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if cuda else None, "images": results}
    out = Path(args.out or f"benchmark-results/detect-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
