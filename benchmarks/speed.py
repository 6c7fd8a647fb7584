"""Speed and memory targets of onnx-esvd, each measured against its reference in the same run.

Generates seeded synthetic data and models under a temporary directory, then measures:

1. pipeline overhead: `onnx-esvd repair` (including the before/after report) on 1,000,000 rows x 32
   features through an MLP 32 -> 256 -> 256 -> 256 -> 1, data in CSV and in NPZ, against one plain
   onnxruntime inference pass over the same file, read the same way with the same batch size;
2. memory: peak RSS of `repair` streaming a 10,000,000-row CSV against a 100,000-row one;
3. CSV reading speed in values per second (with a string group column);
4. the math of one layer (both ESVD steps, all k_i, the multiplier searches) at d = 1024 and 2048;
5. start-up: `onnx-esvd --help`.

    python benchmarks/speed.py [--rows 1000000] [--memory-rows 10000000] [--repeat 3] [--json speed.json]

Times are wall-clock seconds on this machine; compare the ratios, which are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnx_esvd
from onnx_esvd.data import open_table
from onnx_esvd.esvd import esvd
from onnx_esvd.stats import LayerStats

FEATURES = 32
BATCH = 4096
CLI = [sys.executable, "-m", "onnx_esvd_cli.main"]


def make_mlp(widths: list[int], seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        w = (rng.normal(size=(b, a)) * np.sqrt(2.0 / a)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        out = "y" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [out], transB=1, name=f"gemm{i}"))
        if out != "y":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def make_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    group_b = rng.random(n) < 0.35
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    x[group_b] = x[group_b] * 1.3 + 0.4
    y = (x[:, :4].sum(axis=1) + rng.normal(size=n)).astype(np.float32)
    return x, np.where(group_b, "group_b", "group_a"), y


def write_csv(path: Path, rows: int, seed: int, copies: int = 1) -> None:
    """`rows` seeded rows, written `copies` times (the memory test only needs many rows, not new ones)."""
    header = ",".join(f"x{j}" for j in range(FEATURES)) + ",g,y\n"
    chunk = 100_000
    parts = []
    for start in range(0, rows, chunk):
        x, g, y = make_rows(min(chunk, rows - start), seed + start)
        body = np.char.add(np.char.add(_fmt(x), ","), np.char.add(np.char.add(g, ","), _fmt(y[:, None])))
        parts.append("\n".join(body.tolist()) + "\n")
    text = "".join(parts).encode()
    with open(path, "wb") as f:
        f.write(header.encode())
        for _ in range(copies):
            f.write(text)


def _fmt(a: np.ndarray) -> np.ndarray:
    cols = np.char.mod("%.5g", a)
    out = cols[:, 0]
    for j in range(1, cols.shape[1]):
        out = np.char.add(np.char.add(out, ","), cols[:, j])
    return out


def write_npz(path: Path, rows: int, seed: int) -> None:
    chunk = 100_000
    parts = [make_rows(min(chunk, rows - s), seed + s) for s in range(0, rows, chunk)]
    np.savez(path, x=np.concatenate([p[0] for p in parts]), g=np.concatenate([p[1] for p in parts]),
             y=np.concatenate([p[2] for p in parts]))


def plain_pass(model_path: Path, data: Path, features: list[str]) -> float:
    """One onnxruntime inference pass over the file, read by onnx-esvd's reader with the same batch size."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    for batch in open_table(data).batches(features, "g", BATCH):
        sess.run(["y"], {"x": batch.values.astype(np.float32)})
    return time.perf_counter() - started


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of a command run in a fresh process."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True).stdout
    seconds, rss_kb, code = out.split()
    if code != "0":
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}")
    return float(seconds), int(rss_kb) * 1024


def repair_cmd(model: Path, data: Path, out: Path) -> list[str]:
    return [*CLI, "repair", str(model), "--layer", "-2", "--data", str(data), "--group", "g", "--target", "y",
            "--batch-size", str(BATCH), "-o", str(out), "--force", "--quiet"]


def math_seconds(d: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    b = rng.normal(size=(d, d)) / np.sqrt(d)
    cov0, cov1 = a @ a.T, b @ b.T + 0.1 * np.eye(d)
    mean0, mean1 = rng.normal(size=d), rng.normal(size=d)
    n = 10 * d
    gram = n * (cov0 + cov1) + n * (np.outer(mean0, mean0) + np.outer(mean1, mean1))
    stats = LayerStats(n, n, mean0, mean1, cov0, cov1, gram)
    weight = rng.normal(size=(d, d))
    started = time.perf_counter()
    esvd(weight, stats)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--memory-rows", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the overhead comparison (median reported)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="generate into this directory and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="onnx-esvd-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def record(name: str, measured: float, limit: float, unit: str, detail: str, higher_is_better=False) -> None:
        ok = measured >= limit if higher_is_better else measured <= limit
        results.append(dict(target=name, measured=measured, limit=limit, unit=unit, passed=ok, detail=detail))
        print(f"  {name}: {measured:.3g} {unit} (target {'>=' if higher_is_better else '<='} {limit:g}) "
              f"{'PASS' if ok else 'MISS'}  [{detail}]", flush=True)

    try:
        print(f"generating data in {work} ...", flush=True)
        big = make_mlp([FEATURES, 256, 256, 256, 1], seed=0)
        small = make_mlp([FEATURES, 64, 64, 1], seed=1)
        onnx.save(big, str(work / "mlp256.onnx"))
        onnx.save(small, str(work / "mlp64.onnx"))
        csv_path, npz_path = work / "rows.csv", work / "rows.npz"
        write_csv(csv_path, args.rows, seed=0)
        write_npz(npz_path, args.rows, seed=0)
        features = [f"x{j}" for j in range(FEATURES)]
        npz_features = [f"x_{j}" for j in range(FEATURES)]

        print("1. pipeline overhead (repair vs one plain inference pass)", flush=True)
        for label, data, feats in (("CSV", csv_path, features), ("NPZ", npz_path, npz_features)):
            ratios, plains, repairs = [], [], []
            for _ in range(args.repeat):  # alternate the two so that drifts in machine load hit both
                plains.append(plain_pass(work / "mlp256.onnx", data, feats))
                repairs.append(timed(repair_cmd(work / "mlp256.onnx", data, work / "out.onnx"))[0])
                ratios.append(repairs[-1] / plains[-1])
            record(f"repair / plain pass, {label}", float(np.median(ratios)), 3.0, "x",
                   f"median of {args.repeat}: repair {np.median(repairs):.1f}s, plain pass {np.median(plains):.1f}s, "
                   f"{args.rows:,} rows; ratios {', '.join(f'{r:.2f}' for r in ratios)}")

        print("2. memory flat in rows (peak RSS of repair)", flush=True)
        small_csv, large_csv = work / "small.csv", work / "large.csv"
        write_csv(small_csv, 100_000, seed=5)
        copies = max(1, args.memory_rows // 1_000_000)
        write_csv(large_csv, min(args.memory_rows, 1_000_000), seed=5, copies=copies)
        rows_large = min(args.memory_rows, 1_000_000) * copies
        _, rss_small = timed(repair_cmd(work / "mlp64.onnx", small_csv, work / "out.onnx"))
        seconds_large, rss_large = timed(repair_cmd(work / "mlp64.onnx", large_csv, work / "out.onnx"))
        record(f"peak RSS {rows_large:,} rows / 100,000 rows", rss_large / rss_small, 1.5, "x",
               f"{rss_large / 2**20:.0f} MiB vs {rss_small / 2**20:.0f} MiB, MLP 32-64-64-1, {seconds_large:.0f}s")
        record(f"peak RSS at {rows_large:,} rows", rss_large / 2**20, 1024, "MiB", "repair, CSV")

        print("3. CSV reading speed", flush=True)
        table = open_table(csv_path)
        started = time.perf_counter()
        values = sum(b.values.size + len(b.labels) for b in table.batches(features + ["y"], "g", BATCH))
        seconds = time.perf_counter() - started
        record("CSV values per second", values / seconds / 1e6, 8.0, "M/s",
               f"{values:,} values (32 features, a string group column, target) in {seconds:.2f}s",
               higher_is_better=True)

        print("4. math of one layer", flush=True)
        for d, limit in ((1024, 2.0), (2048, 15.0)):
            record(f"ESVD math at d = {d}", math_seconds(d), limit, "s", "both steps, W [d, d]")

        print("5. start-up", flush=True)
        script = Path(sys.executable).parent / "onnx-esvd"
        help_s, _ = timed([str(script) if script.exists() else shutil.which("onnx-esvd") or "onnx-esvd", "--help"])
        python_s, _ = timed([sys.executable, "-c", "pass"])
        record("onnx-esvd --help", help_s, 0.5, "s", f"bare python start-up {python_s:.2f}s")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print()
    print(f"onnx-esvd {onnx_esvd.__version__} speed targets, {time.strftime('%Y-%m-%d')}, {machine}:")
    print(f"{'target':42s} {'measured':>12s} {'limit':>10s} {'ratio':>7s}  result")
    for r in results:
        ratio = r["measured"] / r["limit"]
        print(f"{r['target']:42s} {r['measured']:>10.3g} {r['unit']:<3s}{r['limit']:>8g}   {ratio:>6.2f}  "
              f"{'PASS' if r['passed'] else 'MISS'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"), "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
