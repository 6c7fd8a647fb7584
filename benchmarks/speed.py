"""Speed and memory targets of onnx-esvd, each measured against its reference in the same run.

Generates seeded synthetic data and models under a temporary directory, then measures:

1. pipeline overhead: `onnx-esvd repair` (CLI, including start-up and the before/after report) on
   300,000 and 1,000,000 rows x 32 features through an MLP 32 -> 256 -> 256 -> 256 -> 1, data in CSV
   (and NPZ at the larger size), against one plain onnxruntime pass (default session) over the same
   file read by the same reader with the same batch size; on a quiet machine and with a CPU-bound job
   (a one-thread numpy matmul loop) running beside it. Median of alternating runs;
2. the whole CLI repair of a 1024-wide layer (float64 MLP 64 -> 1024 -> 1024 -> 1, 8,192 rows,
   --holdout 0, a fixed ridge, --refit fair: the refit with an exact float64 reference) against a plain
   float64 numpy implementation of the layer math alone (moments, both ESVD steps, the refit's moments
   and solve), BLAS at one thread in both; the CLI's
   written weights are compared with that exact float64 computation;
3. memory: peak RSS of `repair` streaming a 10,000,000-row CSV against a 100,000-row one;
4. start-up: `onnx-esvd --help`.

    python benchmarks/speed.py [--rows 1000000] [--small-rows 300000] [--memory-rows 10000000] [--repeat 3]
        [--only overhead,wide,memory,startup] [--sets csv-small,csv,npz] [--loads quiet,loaded] [--refit MODE]
        [--json speed.json]

The CLI's processes run from byte-compiled modules, as a pip install leaves them (an editable install under
PYTHONDONTWRITEBYTECODE=1 would recompile the package on every command): the benchmark byte-compiles the
package first, into its git-ignored `__pycache__` directories. Times are wall-clock seconds on this machine; compare the ratios, which are measured in
one run.
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

FEATURES = 32
BATCH = 4096
CLI = [sys.executable, "-m", "onnx_esvd_cli.main"]


def make_mlp(widths: list[int], seed: int, dtype=np.float32) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        w = (rng.normal(size=(b, a)) * np.sqrt(2.0 / a)).astype(dtype)
        bias = (0.1 * rng.normal(size=b)).astype(dtype)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = "y" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [out], transB=1, name=f"gemm{i}"))
        if out != "y":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", elem, ["N", widths[0]])],
                              [helper.make_tensor_value_info("y", elem, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def make_rows(n: int, seed: int, features: int = FEATURES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    group_b = rng.random(n) < 0.35
    x = rng.normal(size=(n, features)).astype(np.float32)
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
    """One onnxruntime inference pass (default session) over the file, read by onnx-esvd's reader with the
    same batch size (the group column read as text, as the repair reads it)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    for batch in open_table(data).batches(features, BATCH, text=["g"]):
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


def repair_cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "repair", str(model), "--layer", "-2", "--data", str(data), "--group", "g", "--target", "y",
            "--batch-size", str(BATCH), "-o", str(out), "--force", "--quiet", *extra]


class Load:
    """A CPU-bound job beside the measurements: a one-thread numpy matmul loop in another process."""

    CODE = ("from threadpoolctl import threadpool_limits; import numpy as np; threadpool_limits(1); "
            "a = np.random.default_rng(0).random((400, 400))\nwhile True: a = a @ a; a /= np.abs(a).max()")

    def __enter__(self) -> "Load":
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE])
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


def overhead(model: Path, data: Path, feats: list[str], repeat: int, work: Path, extra: tuple[str, ...] = ()
             ) -> tuple[float, list, list, list]:
    ratios, plains, repairs = [], [], []
    for _ in range(repeat):  # alternate the two so that drifts in machine load hit both
        plains.append(plain_pass(model, data, feats))
        repairs.append(timed(repair_cmd(model, data, work / "out.onnx", *extra))[0])
        ratios.append(repairs[-1] / plains[-1])
    return float(np.median(ratios)), ratios, plains, repairs


# ---------------------------------------------------------------------------------------------
# target 2: the layer math alone, plain float64 numpy


WIDE_IN, WIDE = 64, 1024
WIDE_RIDGE = 1e-4


def write_wide(work: Path, rows: int) -> tuple[Path, Path]:
    model = make_mlp([WIDE_IN, WIDE, WIDE, 1], seed=3, dtype=np.float64)
    x, g, y = make_rows(rows, seed=3, features=WIDE_IN)
    np.savez(work / "wide.npz", x=x.astype(np.float64), g=g, y=y.astype(np.float64))
    onnx.save(model, str(work / "wide.onnx"))
    return work / "wide.onnx", work / "wide.npz"


def plain_layer_math(model: onnx.ModelProto, x: np.ndarray, g: np.ndarray, y: np.ndarray,
                     c1: float = 15.0, c2: float = 150.0, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """The repair of the middle layer written plainly in float64 numpy: activations, group moments, the
    second- and first-moment ESVD steps (closed-form shrink, bisection on log lambda), then the fair refit
    of the final node (ridge WIDE_RIDGE, KKT by least squares). Returns (W1 new [d, d], final coef [1, d])."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h = np.maximum(x @ w["W0"].T + w["b0"], 0.0)  # the repaired layer's input [n, d]
    a, b = h[g == "group_a"], h[g == "group_b"]
    cov0, cov1 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    gram = h.T @ h
    W = w["W1"]
    d = W.shape[1]

    def bisect(phi, target: float) -> float:
        lo, hi = -700.0, 700.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if phi(np.exp(mid)) > target else (lo, mid)
        return float(np.exp(0.5 * (lo + hi)))

    ev, q = np.linalg.eigh(0.5 * ((cov0 - cov1) + (cov0 - cov1).T))
    keep = np.abs(ev) > d * np.finfo(float).eps * np.abs(ev).max()
    q, s = q[:, keep], np.sqrt(np.abs(ev[keep]))
    u, sig, vt = np.linalg.svd((W @ q) * s, full_matrices=False)
    amat = (vt / s) @ q.T
    k = np.maximum(np.einsum("ij,ij->i", amat @ gram, amat), 0.0)

    def cubic(lam: float) -> np.ndarray:
        r = np.sqrt(k / (6.0 * lam))
        return np.where(k > 0, 2.0 * r * np.sinh(np.arcsinh(1.5 * sig / np.where(k > 0, r, 1.0)) / 3.0), 0.0)

    lam = bisect(lambda t: np.sum(cubic(t) ** 4), np.sum(sig**4) / c2)
    W = W + (u * (cubic(lam) - sig)) @ amat
    delta = a.mean(axis=0) - b.mean(axis=0)
    chol = np.linalg.cholesky(np.outer(delta, delta) + eps * np.eye(d))
    u, sig, vt = np.linalg.svd(W @ chol, full_matrices=False)
    bmat = np.linalg.solve(chol.T, vt.T).T
    k = np.maximum(np.einsum("ij,ij->i", bmat @ gram, bmat), 0.0)
    lam = bisect(lambda t: np.sum((k * sig / (k + t)) ** 2), np.sum(sig**2) / c1)
    W = W + (u * (k * sig / (k + lam) - sig)) @ bmat
    z = np.maximum(h @ W.T + w["b1"], 0.0)  # the final node's input after the repair
    n = z.shape[0]
    zc, tc = z - z.mean(axis=0), y - y.mean()
    lhs = zc.T @ zc + WIDE_RIDGE * n * np.eye(d)
    e = z[g == "group_a"].mean(axis=0) - z[g == "group_b"].mean(axis=0)
    kkt = np.block([[lhs, e[:, None]], [e[None, :], np.zeros((1, 1))]])
    beta = np.linalg.lstsq(kkt, np.concatenate([zc.T @ tc, [0.0]]), rcond=-1)[0][:d]
    return W, beta[None, :]


def wide_target(work: Path, rows: int, repeat: int) -> tuple[float, float, float, float]:
    """(CLI seconds, plain numpy seconds, relative error of the layer weight, of the final coef)."""
    from threadpoolctl import threadpool_limits

    model_path, data = write_wide(work, rows)
    out = work / "wide.esvd.onnx"
    cmd = [*CLI, "repair", str(model_path), "--layer", "-2", "--data", str(data), "--group", "g", "--target", "y",
           "--holdout", "0", "--ridge", str(WIDE_RIDGE), "--refit", "fair", "-o", str(out), "--force", "--quiet"]
    model = onnx.load(str(model_path))
    with np.load(data) as z:
        x, g, y = z["x"], z["g"], z["y"]
    cli_s, plain_s = [], []
    for _ in range(repeat):
        cli_s.append(timed(cmd)[0])
        with threadpool_limits(1, user_api="blas"):
            started = time.perf_counter()
            w_ref, coef_ref = plain_layer_math(model, x, g, y)
            plain_s.append(time.perf_counter() - started)
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    err_w = float(np.max(np.abs(got["W1"] - w_ref)) / np.max(np.abs(w_ref)))
    err_c = float(np.max(np.abs(got["W2"] - coef_ref)) / np.max(np.abs(coef_ref)))
    return float(np.median(cli_s)), float(np.median(plain_s)), err_w, err_c


def compiled_cli() -> str:
    """Byte-compile the package next to its sources (the git-ignored `__pycache__` directories), so the CLI's
    processes start as they do from a pip install: an editable install under PYTHONDONTWRITEBYTECODE=1 would
    otherwise recompile every module of ours on each command (about 0.14 s). Python reads existing bytecode
    whatever that variable says. Returns what was done, for the report."""
    import onnx_esvd_cli

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    dirs = [str(Path(onnx_esvd.__file__).parent), str(Path(onnx_esvd_cli.__file__).parent)]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], check=True, env=env)
    return "the CLI runs from byte-compiled modules (compiled next to the sources first, as pip does on install)"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--small-rows", type=int, default=300_000)
    ap.add_argument("--memory-rows", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each comparison (median reported)")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the (long) memory test")
    ap.add_argument("--only", default="overhead,wide,memory,startup",
                    help="comma-separated parts to run: overhead, wide, memory, startup")
    ap.add_argument("--sets", default="csv-small,csv,npz",
                    help="comma-separated overhead data sets: csv-small (--small-rows CSV), csv, npz (--rows)")
    ap.add_argument("--loads", default="quiet,loaded",
                    help="overhead runs: quiet (the machine as it is), loaded (with the benchmark's CPU-bound job)")
    ap.add_argument("--refit", default=None, help="overhead runs: repair with this --refit (default: the tool's)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="generate into this directory and keep it")
    args = ap.parse_args()
    parts = set(args.only.split(",")) - ({"memory"} if args.skip_memory else set())
    work = args.keep or Path(tempfile.mkdtemp(prefix="onnx-esvd-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    loads = [load_average()]

    def record(name: str, measured: float, limit: float, unit: str, detail: str, higher_is_better=False) -> None:
        ok = measured >= limit if higher_is_better else measured <= limit
        results.append(dict(target=name, measured=measured, limit=limit, unit=unit, passed=ok, detail=detail))
        print(f"  {name}: {measured:.3g} {unit} (target {'>=' if higher_is_better else '<='} {limit:g}) "
              f"{'PASS' if ok else 'MISS'}  [{detail}; load {load_average()}]", flush=True)

    try:
        print(f"generating data in {work} ...", flush=True)
        print(compiled_cli(), flush=True)
        onnx.save(make_mlp([FEATURES, 256, 256, 256, 1], seed=0), str(work / "mlp256.onnx"))
        onnx.save(make_mlp([FEATURES, 64, 64, 1], seed=1), str(work / "mlp64.onnx"))
        sets = []
        chosen = set(args.sets.split(",")) if "overhead" in parts else set()
        for name, rows in (("csv-small", args.small_rows), ("csv", args.rows)):
            if name in chosen:
                write_csv(work / f"rows{rows}.csv", rows, seed=0)
                sets.append(("CSV", rows, work / f"rows{rows}.csv", [f"x{j}" for j in range(FEATURES)], 2.5))
        if "npz" in chosen:
            write_npz(work / "rows.npz", args.rows, seed=0)
            sets.append(("NPZ", args.rows, work / "rows.npz", [f"x_{j}" for j in range(FEATURES)], 3.0))
        if sets:
            print("1. pipeline overhead (repair vs one plain inference pass)", flush=True)
        modes = [m == "loaded" for m in ("quiet", "loaded") if m in args.loads.split(",")]
        for loaded in (modes if sets else ()):
            for label, rows, data, feats, limit in sets:
                extra = ("--refit", args.refit) if args.refit else ()
                if loaded:
                    with Load():
                        ratio, ratios, plains, repairs = overhead(work / "mlp256.onnx", data, feats, args.repeat,
                                                                  work, extra)
                else:
                    ratio, ratios, plains, repairs = overhead(work / "mlp256.onnx", data, feats, args.repeat, work,
                                                              extra)
                how = f", --refit {args.refit}" if args.refit else ""
                record(f"repair / plain, {label} {rows // 1000:,}k{how}{', loaded' if loaded else ''}", ratio, limit,
                       "x",
                       f"median of {args.repeat}: repair {np.median(repairs):.2f}s, plain {np.median(plains):.2f}s; "
                       f"ratios {', '.join(f'{r:.2f}' for r in ratios)}")
                loads.append(load_average())

        if "wide" in parts:
            print("2. 1024-wide layer: whole CLI repair vs plain float64 numpy layer math", flush=True)
            cli_s, plain_s, err_w, err_c = wide_target(work, 8192, args.repeat)
            record("CLI repair / numpy math, d = 1024", cli_s / plain_s, 1.0, "x",
                   f"CLI {cli_s:.2f}s, numpy {plain_s:.2f}s, 8,192 rows, BLAS 1 thread")
            record("weights vs exact float64, d = 1024", max(err_w, err_c), 1e-9, "rel",
                   f"layer {err_w:.1e}, final node {err_c:.1e} (max abs error / max abs weight)")

        if "memory" in parts:
            print("3. memory flat in rows (peak RSS of repair)", flush=True)
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

        if "startup" in parts:
            print("4. start-up", flush=True)
            script = Path(sys.executable).parent / "onnx-esvd"
            help_s, _ = timed([str(script) if script.exists() else shutil.which("onnx-esvd") or "onnx-esvd",
                               "--help"])
            python_s, _ = timed([sys.executable, "-c", "pass"])
            record("onnx-esvd --help", help_s, 0.5, "s", f"bare python start-up {python_s:.2f}s")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print()
    print(f"onnx-esvd {onnx_esvd.__version__} speed targets, {time.strftime('%Y-%m-%d')}, {machine}")
    print(f"load average (1, 5, 15 min) at the start and after each overhead set: {' | '.join(loads)}")
    print(f"{'target':50s} {'measured':>12s} {'limit':>10s} {'ratio':>7s}  result")
    for r in results:
        ratio = r["measured"] / r["limit"]
        print(f"{r['target']:50s} {r['measured']:>10.3g} {r['unit']:<3s}{r['limit']:>8g}   {ratio:>6.2f}  "
              f"{'PASS' if r['passed'] else 'MISS'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"), "loads": loads,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
