"""`repair` on a Dask LocalCluster against one process: time and peak memory (not run by the tests).

    python benchmarks/dask_scale.py --rows 10000000 --files 32 --workers 2 [--refit fair] [--dir DIR]
                                    [--format npz|parquet|csv]

Writes N synthetic rows for the Law School MLP fixture (columns x_0..x_4 and a two-valued group column) as
FILES shards (once; reused when DIR already holds them), then runs `repair --layer -2` (all three passes:
layer statistics, refit, report)
  1. in one process (a child process, so its peak RSS is its own) over the glob, and
  2. with `--engine dask` on a LocalCluster of WORKERS single-threaded worker processes (every pass on the
     workers, merged on the client),
checks that both give the same repair, and prints the wall times, their ratio and the peak RSS of the
client, of each worker and of the one-process run (resource.getrusage).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "fixtures" / "law_school_mlp_legacy.onnx"
GROUP = dict(group="g", groups=["a", "b"])


def peak_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_shards(directory: Path, rows: int, files: int, fmt: str, seed: int = 0) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = {"npz": ".npz", "parquet": ".parquet", "csv": ".csv"}[fmt]
    pattern = str(directory / f"part-*{suffix}")
    names = [directory / f"part-{i:05d}{suffix}" for i in range(files)]
    if all(p.exists() for p in names):
        return pattern
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    for path, a, b in zip(names, bounds, bounds[1:]):
        n = int(b - a)
        g = np.where(rng.random(n) < 0.3, "b", "a")
        x = rng.normal(size=(n, 5)) + (g == "b")[:, None] * 0.4
        cols = {f"x_{j}": x[:, j] for j in range(5)}
        if fmt == "npz":
            np.savez(path, g=g, **cols)
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({**cols, "g": g}), path)
        else:
            with open(path, "w") as f:
                f.write(",".join([*cols, "g"]) + "\n")
                for i in range(n):
                    f.write(",".join(f"{x[i, j]:.9g}" for j in range(5)) + f",{g[i]}\n")
    return pattern


def _summary(res, seconds: float) -> dict:
    from onnx_esvd.graph import read_weight

    return {"seconds": seconds, "esvd_weight": res.esvd.weight.tolist(),
            "final_weight": read_weight(res.model, res.final).astype(float).tolist(),
            "ks_before": res.before.ks, "ks_after": res.after.ks, "rows": res.rows.total}


def single(pattern: str, batch_size: int, refit: str) -> dict:
    from threadpoolctl import threadpool_limits

    from onnx_esvd import repair

    t = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):  # as the command line runs it
        res = repair(MODEL, pattern, layer=-2, refit=refit, bootstrap=0, batch_size=batch_size, **GROUP)
    return {**_summary(res, time.perf_counter() - t), "peak_mib": peak_mib()}


def on_dask(pattern: str, workers: int, batch_size: int, refit: str) -> dict:
    import distributed
    from threadpoolctl import threadpool_limits

    from onnx_esvd import repair

    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=50)
    client = distributed.Client(cluster)
    try:
        client.run(lambda: None)  # workers up before the clock starts
        t = time.perf_counter()
        with threadpool_limits(limits=1, user_api="blas"):
            res = repair(MODEL, pattern, layer=-2, refit=refit, bootstrap=0, batch_size=batch_size, engine="dask",
                         scheduler=client, **GROUP)
        seconds = time.perf_counter() - t
        worker_peaks = client.run(peak_mib)
    finally:
        client.close()
        cluster.close()
    return {**_summary(res, seconds), "client_peak_mib": peak_mib(), "worker_peak_mib": sorted(worker_peaks.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--files", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--format", choices=("npz", "parquet", "csv"), default="npz")
    ap.add_argument("--refit", default="fair", help="the repair's --refit (cdf's solve on the client is the same "
                    "in both runs; fair keeps the benchmark about the passes)")
    ap.add_argument("--dir", type=Path, default=None, help="where the shards live (default: a temp dir)")
    ap.add_argument("--single", metavar="PATTERN", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.single:
        print(json.dumps(single(args.single, args.batch_size, args.refit)))
        return
    import tempfile

    directory = args.dir or Path(tempfile.gettempdir()) / f"onnx-esvd-dask-scale-{args.rows}-{args.files}-{args.format}"
    t = time.perf_counter()
    pattern = write_shards(directory, args.rows, args.files, args.format)
    print(f"data: {args.rows} rows in {args.files} {args.format} files "
          f"({time.perf_counter() - t:.1f} s to prepare)")
    child = subprocess.run([sys.executable, __file__, "--single", pattern, "--batch-size", str(args.batch_size),
                            "--refit", args.refit],
                           capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    one = json.loads(child.stdout.strip().splitlines()[-1])
    many = on_dask(pattern, args.workers, args.batch_size, args.refit)

    def rel(key: str) -> float:
        a, b = np.asarray(many[key]), np.asarray(one[key])
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    print(f"repair --layer -2 --refit {args.refit}: {one['rows']} rows read")
    print(f"one process : {one['seconds']:.2f} s, peak RSS {one['peak_mib']:.0f} MiB")
    print(f"dask ({args.workers} workers): {many['seconds']:.2f} s, client peak RSS {many['client_peak_mib']:.0f} MiB, "
          f"worker peak RSS {', '.join(f'{m:.0f}' for m in many['worker_peak_mib'])} MiB")
    print(f"time ratio one/dask: {one['seconds'] / many['seconds']:.2f}x")
    print(f"same repair: ESVD weights (float64) relative difference {rel('esvd_weight'):.1e}, refitted final weights "
          f"{rel('final_weight'):.1e}, KS before {'equal' if many['ks_before'] == one['ks_before'] else 'DIFFERS'}, "
          f"KS after {'equal' if many['ks_after'] == one['ks_after'] else 'DIFFERS'} ({one['ks_after']:.6f} one process, "
          f"{many['ks_after']:.6f} dask)")


if __name__ == "__main__":
    main()
