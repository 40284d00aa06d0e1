"""Readers of raw interaction data: one module per format, each a pure function.

Every reader returns ``(interactions, users, items)`` polars DataFrames in the shape described
in :mod:`pipeline.readers.common`, and raises :class:`IngestError` naming the file and the
column or line when its input is missing or malformed. None of them needs a run directory.
"""

from pipeline.readers.common import INTERACTIONS_SCHEMA, IngestError
from pipeline.readers.lightgcn import read_lightgcn
from pipeline.readers.movielens import read_movielens
from pipeline.readers.synthetic import SyntheticData, generate_synthetic, read_synthetic
from pipeline.readers.table import read_table

__all__ = [
    "INTERACTIONS_SCHEMA",
    "IngestError",
    "SyntheticData",
    "generate_synthetic",
    "read_lightgcn",
    "read_movielens",
    "read_synthetic",
    "read_table",
]
