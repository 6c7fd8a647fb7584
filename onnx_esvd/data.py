"""Calibration data as column tables read in batches; the sources live in `onnx_esvd.sources`.

This module re-exports them so `from onnx_esvd.data import open_table, Table, Batch, ...` keeps working.
"""

from __future__ import annotations

from .sources.base import (Batch, BatchReader, Table, _label_text, _number_text, as_float, normalise_labels,
                           open_table, render_text)
from .sources.csv import CsvTable
from .sources.frames import ArrayTable, ReaderTable
from .sources.npz import NpzTable
from .sources.parquet import ParquetTable

__all__ = ["ArrayTable", "Batch", "BatchReader", "CsvTable", "NpzTable", "ParquetTable", "ReaderTable", "Table",
           "_label_text", "_number_text", "as_float", "normalise_labels", "open_table", "render_text"]
