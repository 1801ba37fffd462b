"""Side by side: this project and the canonical Ray Data batch-inference recipe, same input.

    python jobs/benchmark_peer.py            # 160 shards x 300 images, units of 64 and 1,024 rows,
                                             # two pairs each, local Ray and a simulated cluster
    python jobs/benchmark_peer.py --quick    # a small version (the tests run it)

The recipe is what Ray's documentation teaches for offline batch inference, with the current
APIs of the installed Ray: ``read_webdataset`` -> ``map_batches`` (decode and crop, in tasks) ->
``map_batches`` (the model, in an actor pool: ``compute=ActorPoolStrategy(size=...)``,
``num_gpus``; ``concurrency`` is deprecated since Ray 2.51) ->
``write_parquet``. Both sides run:

- the same input: tar shards of tiny JPEGs with a face box sidecar
  (``benchmark_scale.make_shards``);
- the same per-image CPU work: the project's ``preprocess`` (decode, crop, resize to 224x224);
- the same stand-in model: ``benchmark_scale.StandInPredictor`` (landmarks computed from each
  row's crop, no network, ``--rate`` rows/s per simulated GPU, by default never the limit), one
  actor per simulated GPU (``num_gpus=1`` on a node with fake GPU resources).

Each run is its own driver process (as ``ray job submit`` starts one) connected to one Ray
cluster started here (every node with Ray's default object store: 30 % of memory, split between
the simulated nodes; not ``Cluster``'s 150 MiB, smaller than one unit): first a single node with
this machine's CPUs and one simulated GPU (plain local Ray), then, unless ``--skip-cluster``,
``benchmark_scale``'s simulated cluster (a head and worker nodes of 4 CPUs and 2 simulated
GPUs). Runs alternate, project then recipe, ``--pairs`` times per unit size. Per run:

- ``steady_rows_per_s``: rows through the predictor per second from 10 % to 90 % of the rows
  (each stand-in call logs its time and rows; the recipe writes its files at the end, so files
  would not show its pace), and ``overall_rows_per_s``: rows / the whole call;
- ``first_file_s``: from the call's start to the first output file in the output folder;
- ``driver_cpu_s_per_million_rows``: the driver process's CPU (user + system) over the whole
  call, per million rows; ``driver_peak_mb``: its peak resident memory (imports included);
- ``read_tasks`` (the project) and the outputs' check: both sides' keys and landmarks compared
  row by row (``outputs_equal``, ``max_abs_diff``).

A run that passes ``--child-timeout`` seconds is stopped and kept as ``timed_out``: its rows and
steady rate are what went through the predictor by then, ``overall_rows_per_s`` is those rows
over the limit (an upper bound of its true figure), its driver figures are unknown and its pair's
outputs are not compared.

``ratios`` are project / recipe of the medians per setting and unit size. Writes
``--out``/peer.json and prints a table; figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import benchmark_scale as scale  # noqa: E402

log = logging.getLogger("benchmark_peer")

QUICK = dict(shards=8, per_shard=40, unit_rows="64", pairs=1, skip_cluster=True)
FULL = dict(shards=160, per_shard=300, unit_rows="64,1024", pairs=2, skip_cluster=False)
CLUSTER_NODES = 2  # worker nodes of the simulated cluster (4 CPUs, 2 simulated GPUs each)


# ---------------------------------------------------------------------------------------------
# What runs in the workers (shipped by value: this file is not an importable module there)
# ---------------------------------------------------------------------------------------------


def _log_call(calls_dir: str, rows: int) -> None:
    with open(os.path.join(calls_dir, f"{os.getpid()}.log"), "a") as f:
        f.write(f"{time.time()} {rows}\n")


def project_stand_in(rate: float, calls_dir: str) -> type:
    """The project's predictor class: the stand-in, logging each call."""

    def call(self, batch):
        out = scale.StandInPredictor.__call__(self, batch)
        _log_call(calls_dir, len(batch["key"]))
        return out

    return type("StandInPredictor", (scale.stand_in(rate),), {"__call__": call})


def recipe_decode(batch: dict) -> dict:
    """The recipe's decode stage: the project's ``preprocess`` on every image."""
    from pipeline.stages.preprocess import SampleError, preprocess

    keys = batch["__key__"]
    n = len(keys)
    pixels = np.zeros((n, 224, 224, 3), dtype=np.uint8)
    crop = np.full((n, 3), np.nan, dtype=np.float64)
    error = np.full(n, "", dtype=object)
    for i in range(n):
        try:
            bbox = json.loads(batch["json"][i])["bbox"]
            pixels[i], _, _, crop[i] = preprocess(batch["jpg"][i], bbox)
        except (SampleError, ValueError, KeyError) as exc:
            error[i] = str(exc)
    return {"key": np.asarray(keys, dtype=object), "pixels": pixels, "crop": crop,
            "error": error}


class RecipeModel:
    """The recipe's model stage: the same stand-in, returning key and landmarks."""

    def __init__(self, rate: float, calls_dir: str):
        self.model = scale.stand_in(rate)()
        self.calls_dir = calls_dir

    def __call__(self, batch: dict) -> dict:
        out = self.model(batch)
        _log_call(self.calls_dir, len(batch["key"]))
        return {"key": out["key"], "landmarks": out["landmarks"]}


# ---------------------------------------------------------------------------------------------
# One run: a driver process of its own
# ---------------------------------------------------------------------------------------------


def child(args) -> dict:
    """Run one side once as this process's driver; returns its figures."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(scale)
    unit_rows = int(args.unit_rows)
    Path(args.calls).mkdir(parents=True, exist_ok=True)
    if args.child == "project":
        from pipeline.inference.config import InferConfig
        from pipeline.inference.job import run_inference

        predictor = project_stand_in(args.rate, args.calls)
        cfg = InferConfig(input=args.input, output=args.output, device="gpu", decode="cpu",
                          num_predictors=args.gpus, batch_size=unit_rows, unit_rows=unit_rows,
                          ray_address=args.address)
    else:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    with scale.DriverSampler() as sampler:
        started = time.time()
        if args.child == "project":
            summary = run_inference(cfg, predictor=predictor)
            rows, extra = summary.samples, {"read_tasks": summary.placement.get("read_tasks"),
                                            "leases": summary.placement.get("leases")}
        else:
            ray.init(address=args.address, logging_level=logging.WARNING)
            ds = ray.data.read_webdataset(args.input, decoder=None)
            ds = ds.map_batches(recipe_decode, batch_format="numpy")
            ds = ds.map_batches(RecipeModel, fn_constructor_args=(args.rate, args.calls),
                                batch_size=unit_rows, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=args.gpus), num_gpus=1)
            ds.write_parquet(args.output)
            rows, extra = None, {}
        seconds = time.time() - started
    ray.shutdown()
    cpu = sampler.samples[-1][1] - sampler.samples[0][1]
    files = [p for p in Path(args.output).rglob("*.parquet")]
    calls = _calls(Path(args.calls))
    rows = rows if rows is not None else sum(n for _, n in calls)
    return {
        "side": args.child,
        "rows": rows,
        "seconds": round(seconds, 2),
        "steady_rows_per_s": _steady(calls),
        "overall_rows_per_s": round(rows / seconds, 1),
        "first_file_s": round(min(p.stat().st_mtime for p in files) - started, 2),
        "files": len(files),
        "predictor_calls": len(calls),
        "driver_cpu_s": round(cpu, 2),
        "driver_cpu_s_per_million_rows": round(1e6 * cpu / max(rows, 1), 2),
        "driver_peak_mb": round(sampler.peak_mb(), 1),
        **extra,
    }


def _calls(folder: Path) -> list[tuple[float, int]]:
    out = []
    for path in folder.glob("*.log"):
        for line in path.read_text().splitlines():
            moment, rows = line.split()
            out.append((float(moment), int(rows)))
    return sorted(out)


def _steady(calls: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of rows through the predictor against time, 10 % to 90 %."""
    total = sum(n for _, n in calls)
    done, points = 0, []
    for moment, n in calls:
        done += n
        if 0.1 * total <= done <= 0.9 * total:
            points.append((moment, done))
    if len(points) < 3:
        return None
    t, y = np.asarray(points).T
    return round(float(np.polyfit(t - t[0], y, 1)[0]), 1)


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def read_output(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, landmarks (n, 68, 2)) of an output folder's Parquet files, sorted by key."""
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers the recipe's tensor column type with pyarrow)

    keys, points = [], []
    for path in sorted(folder.rglob("*.parquet")):
        if "_" in {part[0] for part in path.relative_to(folder).parts}:
            continue  # the project's _retired/ and other bookkeeping
        table = pq.read_table(path, columns=["key", "landmarks"])
        keys.extend(table.column("key").to_pylist())
        column = table.column("landmarks").combine_chunks()
        if hasattr(column, "to_numpy_ndarray"):
            values = column.to_numpy_ndarray()
        elif hasattr(column.type, "storage_type") and not hasattr(column, "flatten"):
            values = column.to_numpy()
        else:
            values = np.asarray(column.to_pylist(), dtype=np.float32)
        points.append(np.asarray(values, dtype=np.float32).reshape(len(table), -1, 2))
    keys = np.asarray(keys, dtype=object)
    points = np.concatenate(points) if points else np.zeros((0, 68, 2), np.float32)
    order = np.argsort(keys, kind="stable")
    return keys[order], points[order]


def compare(project: Path, recipe: Path) -> dict:
    pk, pl = read_output(project)
    rk, rl = read_output(recipe)
    same_keys = len(pk) == len(rk) and bool(np.all(pk == rk))
    diff = float(np.nanmax(np.abs(pl - rl))) if same_keys and len(pk) else None
    return {"rows": len(pk), "recipe_rows": len(rk), "same_keys": same_keys,
            "duplicate_keys": int(len(pk) - len(set(pk.tolist()))),
            "max_abs_diff": diff, "outputs_equal": same_keys and diff == 0.0}


def run_setting(name: str, address: str, gpus: int, args, workdir: Path, total: int) -> dict:
    runs, checks = [], []
    for unit_rows in [int(u) for u in args.unit_rows.split(",")]:
        for pair in range(args.pairs):
            outputs = {}
            for side in ("project", "recipe"):  # A, B, A, B
                tag = f"{name}-{unit_rows}-{pair}-{side}"
                out, calls = workdir / f"out-{tag}", workdir / f"calls-{tag}"
                result = workdir / f"{tag}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side,
                       "--address", address, "--input", str(workdir / "in"), "--output",
                       str(out), "--calls", str(calls), "--unit-rows", str(unit_rows),
                       "--gpus", str(gpus), "--rate", str(args.rate), "--result", str(result)]
                entry = {"setting": name, "unit_rows": unit_rows, "pair": pair}
                try:
                    proc = subprocess.run(
                        cmd, capture_output=True, text=True, timeout=args.child_timeout,
                        env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
                except subprocess.TimeoutExpired:
                    entry.update(timed_out_run(side, _calls(calls), args.child_timeout, total))
                    log.warning("%s: stopped after %d s: %s", tag, args.child_timeout, entry)
                    runs.append(entry)
                    outputs[side] = out
                    shutil.rmtree(calls, ignore_errors=True)
                    continue
                if proc.returncode != 0:
                    raise RuntimeError(f"{tag} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
                entry.update(json.loads(result.read_text()), timed_out=False)
                if entry["rows"] != total:
                    raise RuntimeError(f"{tag}: {entry['rows']} rows, expected {total}")
                log.info("%s: %s", tag, entry)
                runs.append(entry)
                outputs[side] = out
                shutil.rmtree(calls)
            check = {"setting": name, "unit_rows": unit_rows, "pair": pair}
            stopped = [r["side"] for r in runs[-2:] if r["timed_out"]]
            if stopped:
                check.update(outputs_equal=None, skipped=f"{', '.join(stopped)} timed out")
            else:
                check.update(compare(outputs["project"], outputs["recipe"]))
            log.info("outputs %s", check)
            checks.append(check)
            for out in outputs.values():
                shutil.rmtree(out, ignore_errors=True)
    return {"runs": runs, "checks": checks}


def timed_out_run(side: str, calls: list[tuple[float, int]], limit: float, total: int) -> dict:
    """What a run stopped at its time limit had done: rows through the predictor by then."""
    rows = sum(n for _, n in calls)
    return {"side": side, "timed_out": True, "rows": rows, "rows_expected": total,
            "seconds": limit, "steady_rows_per_s": _steady(calls),
            "overall_rows_per_s": round(rows / limit, 1), "first_file_s": None, "files": None,
            "predictor_calls": len(calls), "driver_cpu_s": None,
            "driver_cpu_s_per_million_rows": None, "driver_peak_mb": None}


FIGURES = ("steady_rows_per_s", "overall_rows_per_s", "first_file_s",
           "driver_cpu_s_per_million_rows", "driver_peak_mb")


def ratios(runs: list[dict]) -> list[dict]:
    """project / recipe of the medians, per setting and unit size."""
    out = []
    for setting, unit_rows in sorted({(r["setting"], r["unit_rows"]) for r in runs}):
        group = [r for r in runs if (r["setting"], r["unit_rows"]) == (setting, unit_rows)]
        entry = {"setting": setting, "unit_rows": unit_rows,
                 "timed_out": sorted({r["side"] for r in group if r["timed_out"]})}
        for figure in FIGURES:
            med = {}
            for side in ("project", "recipe"):
                values = [r[figure] for r in runs if (r["setting"], r["unit_rows"], r["side"])
                          == (setting, unit_rows, side) and r[figure] is not None]
                med[side] = statistics.median(values) if values else None
            entry[figure] = {**med, "ratio": round(med["project"] / med["recipe"], 3)
                             if med["project"] and med["recipe"] else None}
        out.append(entry)
    return out


def table(result: dict) -> str:
    lines = ["| setting | unit rows | " + " | ".join(FIGURES) + " |",
             "| --- | --- |" + " --- |" * len(FIGURES)]
    for entry in result["ratios"]:
        cells = []
        for figure in FIGURES:
            e = entry[figure]
            cells.append(f"{e['project']} / {e['recipe']} = {e['ratio']}")
        lines.append(f"| {entry['setting']} | {entry['unit_rows']} | " + " | ".join(cells) + " |")
    lines.append("outputs equal: " + ", ".join(
        f"{c['setting']}/{c['unit_rows']}/{c['pair']}: {c.get('skipped', c['outputs_equal'])}"
        for c in result["checks"]))
    for r in result["runs"]:
        if r["timed_out"]:
            lines.append(f"{r['setting']}/{r['unit_rows']}/{r['pair']} {r['side']}: stopped at "
                         f"{r['seconds']} s with {r['rows']} of {r['rows_expected']} rows")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small run (the tests run it)")
    p.add_argument("--shards", type=int)
    p.add_argument("--per-shard", type=int)
    p.add_argument("--unit-rows", help="unit sizes, comma-separated (default 64,1024)")
    p.add_argument("--pairs", type=int, help="project/recipe pairs per unit size (default 2)")
    p.add_argument("--rate", type=float, default=1e6,
                   help="rows/s of one simulated GPU (default 1e6: never the limit)")
    p.add_argument("--skip-cluster", action="store_true", default=None,
                   help="only the single-node Ray, not the simulated cluster")
    p.add_argument("--child-timeout", type=float, default=900,
                   help="seconds one run may take before it is stopped and kept as timed out "
                   "(default 900)")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", default="benchmark-results", help="folder for peer.json")
    # One run as its own driver (used by the benchmark itself).
    p.add_argument("--child", choices=("project", "recipe"), help=argparse.SUPPRESS)
    for name in ("--address", "--input", "--output", "--calls", "--result"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--gpus", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    from ray.cluster_utils import Cluster

    args = parse(argv)
    if args.child:  # its log goes to the parent only when the run fails
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        result = child(args)
        Path(args.result).write_text(json.dumps(result))
        return result
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="peer-"))
    total = scale.make_shards(workdir / "in", args.shards, args.per_shard)
    result = {"settings": {k: v for k, v in vars(args).items()
                           if k not in ("out", "child", "address", "input", "output", "calls",
                                        "result", "gpus")},
              "rows": total, "machine_cpus": os.cpu_count(), "runs": [], "checks": []}
    settings = [("local", {"num_cpus": os.cpu_count(), "num_gpus": 1}, 0)]
    if not args.skip_cluster:
        settings.append(("cluster", {"num_cpus": 2}, CLUSTER_NODES))
    settings = [(name, {**head, "include_dashboard": False,
                        "object_store_memory": scale.object_store_bytes(nodes + 1)}, nodes)
                for name, head, nodes in settings]
    try:
        for name, head, nodes in settings:
            cluster = Cluster(initialize_head=True, head_node_args=head)
            for _ in range(nodes):
                cluster.add_node(num_cpus=scale.CPUS_PER_NODE, num_gpus=scale.GPUS_PER_NODE,
                                 object_store_memory=head["object_store_memory"])
            cluster.wait_for_nodes()
            gpus = head.get("num_gpus", 0) + nodes * scale.GPUS_PER_NODE
            try:
                part = run_setting(name, cluster.address, gpus, args, workdir, total)
            finally:
                cluster.shutdown()
            result["runs"] += part["runs"]
            result["checks"] += part["checks"]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["ratios"] = ratios(result["runs"])
    compared = [c["outputs_equal"] for c in result["checks"] if c["outputs_equal"] is not None]
    result["outputs_equal"] = bool(compared) and all(compared)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
