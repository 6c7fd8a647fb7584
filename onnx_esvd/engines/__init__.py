"""Engines that run the passes somewhere other than this process; each is an optional extra.

dask_engine  the layer pass as one task per data file on a Dask cluster (`pip install 'onnx-esvd[dask]'`)
"""
