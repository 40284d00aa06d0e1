"""Declared columns of every tabular artifact, for ``rundir.read_parquet`` / ``scan_parquet``.

One place per artifact: the stage that writes it and every stage that reads it check the same
declaration, so a mismatch is an error naming the file and the column.
"""

from __future__ import annotations

# interactions/interactions.parquet (ingest)
INTERACTIONS_KINDS = {
    "user": "str",
    "item": "str",
    "timestamp": "int",
    "weight": "float",
    "split": "str",
}
# features/vocab_{users,items}.parquet (features)
USER_VOCAB_KINDS = {"user": "str", "user_idx": "int"}
ITEM_VOCAB_KINDS = {"item": "str", "item_idx": "int"}
# features/events.parquet (features)
EVENTS_KINDS = {
    "user_idx": "int",
    "item_idx": "int",
    "timestamp": "int",
    "weight": "float",
    "split": "str",
}
# features/{users,items}.parquet (features); attribute columns come on top
USER_FEATURES_KINDS = {"user_idx": "int", "history_train": "list[int]", "history_all": "list[int]"}
ITEM_FEATURES_KINDS = {
    "item_idx": "int",
    "pop_train": "int",
    "pop_all": "int",
    "audience_train": "list[int]",
    "audience_all": "list[int]",
}
SPLITS = ("train", "valid", "test")  # split values of the events artifact
