"""Run every pass of onnx-esvd on a Ray cluster: one task per data file, through Ray Data's `map_batches`.

A callable class holds the pass; Ray keeps a pool of its actors, and each actor's process keeps one
onnxruntime session per model (`run_pass` caches them). Each file's partial statistics come back as bytes
(.npz, no pickle) and onnx-esvd merges them on the driver. The workers must see the data files under the
same paths as the driver.
"""

import numpy as np
import ray

from onnx_esvd.passes import run_pass


class RunPass:
    """One actor: runs the pass on the files of each batch."""

    def __init__(self, task):
        self.task = task

    def __call__(self, batch):
        results = [run_pass(self.task, p, int(r)) for p, r in zip(batch["path"], batch["first_row"])]
        return {"i": batch["i"], "result": np.array(results, dtype=object)}


def ray_engine(actors=2):
    """An onnx-esvd engine (`engine=` of repair, audit, check and sweep) on the connected Ray cluster."""

    def engine(task, files):
        jobs = ray.data.from_items([{"i": i, "path": str(p), "first_row": int(r)} for i, (p, r) in enumerate(files)])
        rows = jobs.map_batches(RunPass, fn_constructor_args=(task,), batch_size=1, concurrency=actors).take_all()
        return [bytes(r["result"]) for r in sorted(rows, key=lambda r: r["i"])]

    return engine


if __name__ == "__main__":
    import sys

    import onnx_esvd

    model, data = sys.argv[1], sys.argv[2]  # e.g. model.onnx 'calib/part-*.parquet'
    ray.init()
    result = onnx_esvd.repair(model, data, layer=-2, group="race", engine=ray_engine())
    result.save("model.esvd.onnx")
    print(f"KS {result.before.ks:.4f} -> {result.after.ks:.4f}")
