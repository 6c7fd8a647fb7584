"""Where rows come from: one `Table` interface, one module per family of sources.

base     Table, Batch, label/text rendering, open_table (dispatch by path suffix or object type)
csv      delimited text (.csv/.tsv/.txt, gzip/bz2/xz), streamed in chunks of lines
npz      NumPy .npz archives, streamed member by member
parquet  Parquet files via pyarrow (optional), record batch by record batch
frames   in-memory columns (mappings, pandas DataFrames, pyarrow Tables) and batch readers
"""

from .base import Batch, BatchReader, Table, normalise_labels, open_table
from .csv import CsvTable
from .frames import ArrayTable, ReaderTable
from .npz import NpzTable
from .parquet import ParquetTable

__all__ = ["ArrayTable", "Batch", "BatchReader", "CsvTable", "NpzTable", "ParquetTable", "ReaderTable", "Table",
           "normalise_labels", "open_table"]
