"""Object-storage benchmark against a loopback S3 server (moto, from the dev extra).

Measures (1) listing a prefix of many shards: seconds and HTTP requests, and (2) streaming one
large tar shard: seconds, MB/s and the peak Python memory while its samples are read.

    python jobs/benchmark_storage.py --shards 10000 --big-tar-mb 256 --out benchmark-results/
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fault/counting proxy lives with the tests


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--big-tar-mb", type=int, default=256)
    parser.add_argument("--out", default="benchmark-results")
    args = parser.parse_args(argv)

    import boto3
    import s3fs
    from s3server import FaultProxy

    from pipeline.io.shards import list_shards, read_samples

    # The server runs in its own process, so the memory measured below is the reader's alone.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host, port = probe.getsockname()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection((host, port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    proxy = FaultProxy((host, port)).start()
    creds = {"key": "bench", "secret": "bench", "client_kwargs": {"region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                 aws_access_key_id="bench", aws_secret_access_key="bench",
                 ).create_bucket(Bucket="bench")
    direct = s3fs.S3FileSystem(endpoint_url=f"http://{host}:{port}", **creds)
    options = {"endpoint_url": proxy.url, **creds}
    results: dict = {"server": "moto server (own process) on loopback, behind a counting proxy"}

    started = time.perf_counter()
    names = {f"bench/many/{i // 1000:03d}/shard-{i:06d}.tar": b"" for i in range(args.shards)}
    direct.pipe(names)
    results["upload_s"] = round(time.perf_counter() - started, 2)
    proxy.reset()
    s3fs.S3FileSystem.clear_instance_cache()
    started = time.perf_counter()
    shards = list_shards("s3://bench/many/", storage_options=options)
    results["listing"] = {
        "shards": len(shards),
        "seconds": round(time.perf_counter() - started, 3),
        "http_requests": dict(proxy.requests),
    }
    print(f"listing {len(shards)} shards: {results['listing']}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.tar"
        member = 1 << 20
        with tarfile.open(big, "w") as tar:
            for i in range(args.big_tar_mb):
                payload = (i.to_bytes(4, "little") * (member // 4))
                info = tarfile.TarInfo(f"sample-{i:05d}.jpg")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        direct.put(str(big), "bench/big/big.tar")
        size = big.stat().st_size
    shard = list_shards("s3://bench/big/", storage_options=options)[0]
    proxy.reset()
    tracemalloc.start()
    started = time.perf_counter()
    count = sum(len(s.data) for s in read_samples(shard, options)) // member
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    results["streaming"] = {
        "tar_mb": round(size / 2**20, 1),
        "samples": count,
        "seconds": round(seconds, 2),
        "mb_per_s": round(size / 2**20 / seconds, 1),
        "peak_python_memory_mb": round(peak / 2**20, 1),
        "http_get_requests": proxy.requests["GET"],
    }
    print(f"streaming one {size / 2**20:.0f} MB tar: {results['streaming']}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "storage.json").write_text(json.dumps(results, indent=2))
    proxy.stop()
    server.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
