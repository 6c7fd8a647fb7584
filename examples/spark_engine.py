"""Run every pass of onnx-esvd on a Spark cluster: one task per data file, through `mapInPandas`.

The engine maps a `PassTask` over the (file, first global row) pairs: each executor's Python worker runs
`run_pass`, which keeps one onnxruntime session per model in that worker, and returns the pass's partial
statistics as bytes (.npz, no pickle); onnx-esvd merges them on the driver. The executors must see the data
files under the same paths as the driver (a shared or object file system).
"""

import pandas as pd

from onnx_esvd.passes import run_pass


def spark_engine(spark):
    """An onnx-esvd engine (`engine=` of repair, audit, check and sweep) running on the SparkSession `spark`."""

    def engine(task, files):
        shared = spark.sparkContext.broadcast(task)  # the model bytes travel to each executor once
        jobs = pd.DataFrame({"i": range(len(files)), "path": [str(p) for p, _ in files],
                             "first_row": [int(r) for _, r in files]})

        def run(batches):  # on the executors
            for pdf in batches:
                yield pd.DataFrame({"i": pdf["i"],
                                    "result": [run_pass(shared.value, p, int(r))
                                               for p, r in zip(pdf["path"], pdf["first_row"])]})

        rows = (spark.createDataFrame(jobs).repartition(len(files))
                .mapInPandas(run, schema="i long, result binary").collect())
        shared.unpersist()
        return [bytes(r["result"]) for r in sorted(rows, key=lambda r: r["i"])]

    return engine


if __name__ == "__main__":
    import sys

    from pyspark.sql import SparkSession

    import onnx_esvd

    model, data = sys.argv[1], sys.argv[2]  # e.g. model.onnx 'calib/part-*.parquet'
    spark = SparkSession.builder.appName("onnx-esvd").getOrCreate()
    result = onnx_esvd.repair(model, data, layer=-2, group="race", engine=spark_engine(spark))
    result.save("model.esvd.onnx")
    print(f"KS {result.before.ks:.4f} -> {result.after.ks:.4f}")
