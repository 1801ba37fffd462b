"""Benchmark the fine-tuning job: one command on a GPU machine, a short version on CPU.

    python jobs/benchmark_finetune.py                       # GPU defaults: 4000 faces, 1 worker
    python jobs/benchmark_finetune.py --faces 64 --test-faces 16 --epochs 2 --batch-size 8 \\
        --device cpu --scaling-workers 1,2                  # a short CPU run, with 1 vs 2 workers

It writes a synthetic labelled archive (``--faces``, 10 % held out for validation by key hash), a
separate synthetic test archive (``--test-faces``, another seed) and the real annotated photos of
``--real`` as a labelled shard, fine-tunes with ``pipeline.backend.trainer`` (decoded crops cached),
and reports training images/s, the minutes until the validation NME first drops below ``--target``,
and the final NME of the exported model on the synthetic test faces and on the real photos.
``--scaling-workers 1,2`` first trains ``--scaling-epochs`` on the same data with each worker count
(all CPUs shared between the workers) and reports their images/s. Results go to
``benchmark-results/finetune-<device>.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

# Run from anywhere, installed or not (as under `ray job submit --working-dir .`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backend.trainer import main as finetune  # noqa: E402
from pipeline.demo.synthetic import write_sample_archive  # noqa: E402
from pipeline.evaluation.config import EvalConfig  # noqa: E402
from pipeline.evaluation.evaluate import main as evaluate  # noqa: E402
from pipeline.training.config import FinetuneConfig  # noqa: E402
from pipeline.training.importer import import_annotated_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The annotated photos sit beside the repository in a workspace, inside it on a copied machine.
REAL_CANDIDATES = (REPO / "shared" / "data" / "faces", REPO.parent / "shared" / "data" / "faces")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default=str(REPO / "benchmark-results" / "finetune"))
    p.add_argument("--faces", type=int, default=4000, help="synthetic training+validation faces")
    p.add_argument("--test-faces", type=int, default=500, help="held-out synthetic test faces")
    p.add_argument(
        "--real",
        default=None,
        help="folder of real photos with .json 68-point labels (0-based); default: the first of "
        + ", ".join(str(c) for c in REAL_CANDIDATES)
        + " that exists (none: the real-photo score is left out, with a warning)",
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--init",
        choices=("auto", "imagenet", "random"),
        default="auto",
        help="auto: ImageNet features when torchvision's file is cached, else random",
    )
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--device", choices=("auto", "gpu", "cuda", "cpu"), default="auto",
                   help="gpu (cuda: its former name), cpu, or auto")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast (the head in fp32) on CUDA, fp32 on CPU")
    p.add_argument("--target", type=float, default=0.05, help="validation NME to time")
    p.add_argument("--scaling-workers", default="", help="e.g. 1,2: compare worker counts")
    p.add_argument("--scaling-epochs", type=int, default=2)
    p.add_argument("--freeze-features", action="store_true")
    args = p.parse_args(argv)
    if args.real is None:
        found = [c for c in REAL_CANDIDATES if c.is_dir()]
        args.real = str(found[0]) if found else None
    elif not Path(args.real).is_dir() and "://" not in args.real:
        p.error(f"--real: no such folder: {args.real}")
    return args


def pick_init(choice: str) -> str:
    """ImageNet init needs torchvision's file; a machine without network may not have it."""
    if choice != "auto":
        return choice
    import torch

    cached = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    return "imagenet" if cached.exists() else "random"


def prepare_data(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """Write the archives once; reruns reuse them (same arguments give the same bytes)."""
    paths = {
        "train": work / f"synthetic-{args.faces}",
        "test": work / f"test-{args.test_faces}",
        "real": work / "real",
    }
    per_shard = 500
    for key, count, seed in (("train", args.faces, 0), ("test", args.test_faces, 1)):
        if not paths[key].exists():
            shards = max(1, -(-count // per_shard))
            started = time.time()
            write_sample_archive(str(paths[key]), shards, -(-count // shards), seed=seed)
            logging.info("wrote %s in %.0f s", paths[key], time.time() - started)
    if args.real is None:
        logging.warning(
            "no real annotated photos found (looked in %s): only synthetic faces are scored",
            ", ".join(str(c) for c in REAL_CANDIDATES),
        )
        del paths["real"]
    elif not paths["real"].exists():
        import_annotated_folder(args.real, str(paths["real"]), origin=0, annotation="json")
    return {k: str(v) for k, v in paths.items()}


def run(args, data, work: Path, name: str, workers: int, epochs: int, init: str):
    """One fresh fine-tuning run (an earlier run of the same name is removed, not resumed)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpu = args.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    cfg = FinetuneConfig(
        input=data["train"],
        storage_path=str(work / "runs"),
        name=name,
        val_fraction=0.1,
        init=init,
        epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        freeze_features=args.freeze_features,
        num_workers=workers,
        device={"cuda": "gpu"}.get(args.device, args.device),
        precision=args.precision,
        cpus_per_worker=1.0 if gpu else cpus / workers,
        threads_per_worker=None if gpu else max(1, cpus // workers),
        cache=True,
        max_failures=0,
    )
    started = time.time()
    summary = finetune(cfg)
    return summary, time.time() - started


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    args = parse(argv)
    import torch

    from pipeline.backend.cluster import ensure_ray
    from pipeline.model.precision import resolve_precision

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, work)
    init = pick_init(args.init)
    ensure_ray()
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)"
    results: dict = {"device": device, "init": init, "args": vars(args), "scaling": {},
                     "precision": resolve_precision(args.precision,
                                                    "cuda" if on_gpu else "cpu")}

    for workers in [int(w) for w in args.scaling_workers.split(",") if w]:
        summary, wall = run(
            args, data, work, f"scaling-{workers}", workers, args.scaling_epochs, init
        )
        last = summary.history[-1]  # the first epoch also warms the data pipeline up
        results["scaling"][workers] = {
            "images_per_s": last["images_per_s"],
            "epoch_images": last["train_images"],
            "epoch_seconds": last["train_seconds"],
            "wall_s": wall,
        }

    summary, wall = run(args, data, work, "main", args.num_workers, args.epochs, init)
    elapsed, reached = 0.0, None
    for h in summary.history:  # training + validation time, without the job's startup
        elapsed += h["train_seconds"] + h["val_seconds"]
        if reached is None and h["val_nme"] < args.target:
            reached = {"epoch": h["epoch"], "minutes": elapsed / 60}
    scores = {}
    for key in [k for k in ("test", "real") if k in data]:
        report = evaluate(
            EvalConfig(
                labels=data[key],
                weights=summary.export,
                report=str(work / f"eval-{key}.json"),
                device="gpu" if on_gpu else "cpu",
                precision=args.precision,
            )
        )
        scores[key] = {k: report[k] for k in ("samples", "nme", "failure_rate@0.08", "auc@0.08")}
    results.update(
        train_images_per_s=[h["images_per_s"] for h in summary.history],
        val_nme=[h["val_nme"] for h in summary.history],
        wall_s=wall,
        reached_target=reached,
        target=args.target,
        best=summary.best,
        test=scores,
        model=summary.export,
    )
    out = REPO / "benchmark-results" / f"finetune-{'gpu' if on_gpu else 'cpu'}.json"
    out.write_text(json.dumps(results, indent=2, default=str))

    print(
        f"\ndevice: {device}, {results['precision']}, init {init}, {args.faces} faces, "
        f"{args.epochs} epochs, "
        f"{args.num_workers} worker(s), batch {args.batch_size}/worker"
    )
    for workers, row in results["scaling"].items():
        print(f"scaling: {workers} worker(s): {row['images_per_s']:.2f} training images/s")
    rates = results["train_images_per_s"]
    print(f"training images/s: first epoch {rates[0]:.1f}, best epoch {max(rates):.1f}")
    print(f"validation NME per epoch: {', '.join(f'{100 * v:.2f}' for v in results['val_nme'])}")
    print(
        f"NME < {100 * args.target:g} %: "
        + (f"epoch {reached['epoch']}, {reached['minutes']:.1f} min" if reached else "not reached")
    )
    for key, row in scores.items():
        print(
            f"{key}: {row['samples']} faces, NME {100 * row['nme']:.2f} %, "
            f"failure {100 * row['failure_rate@0.08']:.1f} %, AUC {row['auc@0.08']:.3f}"
        )
    print(f"total {wall / 60:.1f} min for the main run -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
