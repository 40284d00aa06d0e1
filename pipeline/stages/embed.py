"""The embed stage: vectors of every item and of every user to evaluate, from the best model.

Items are rows 1..n_items-1 of the item vocabulary (row 0 is out-of-vocabulary and is never
retrieved), encoded with their train+valid audience. Users are those with at least one test
event, encoded with their train+valid history: the same inputs serving gives the exported user
tower. The towers run on a GPU when torch sees one, on the CPU otherwise.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.core.rundir import (
    BEST_CHECKPOINT,
    EMBED_META,
    ITEM_EMBEDDINGS,
    USER_EMBEDDINGS,
    RunDir,
    StageRecord,
    write_json,
    write_parquet,
)
from pipeline.training.batches import load_feature_tensors, load_pairs
from pipeline.training.distributed import resolve_device
from pipeline.training.encoding import encode_items, encode_users, load_model


def vectors_table(id_name: str, ids: np.ndarray, vecs: np.ndarray) -> pa.Table:
    """An (id, vector) table with the vectors as fixed-size float32 lists."""
    flat = pa.array(np.ascontiguousarray(vecs, dtype=np.float32).reshape(-1))
    return pa.table(
        {
            id_name: pa.array(ids.astype(np.int32)),
            "vector": pa.FixedSizeListArray.from_arrays(flat, vecs.shape[1]),
        }
    )


def embed_stage(run: RunDir, batch_size: int = 8192) -> StageRecord:
    """Write item and test-user embeddings plus the metric/normalisation they were trained for."""
    model, ckpt = load_model(run.path(BEST_CHECKPOINT))
    ft = load_feature_tensors(run, phases=("all",))  # encoded with train+valid inputs only
    if not model.config.item_audience:
        ft = ft.without_audience()
    device = resolve_device("auto")  # a GPU when torch sees one: the towers' forward there
    model.to(device)
    ft = ft.on(device)
    item_vecs = encode_items(model, ft, "all", batch_size).numpy()  # (n_items - 1, dim)
    test_users, _ = load_pairs(run, ["test"])
    has_test = np.zeros(ft.n_users, dtype=bool)  # (n_users,) by row: no sort of 10^8 events
    has_test[test_users] = True
    has_test[0] = False  # the OOV row
    users = np.flatnonzero(has_test)  # sorted, unique
    user_vecs = encode_users(model, ft, torch.from_numpy(users), "all", batch_size).numpy()
    item_ids = np.arange(1, ft.n_items, dtype=np.int64)
    write_parquet(vectors_table("item_idx", item_ids, item_vecs), run.path(ITEM_EMBEDDINGS))
    write_parquet(vectors_table("user_idx", users, user_vecs), run.path(USER_EMBEDDINGS))
    normalized = bool(ckpt["tower_config"]["normalize"])
    write_json(
        {
            "dim": int(item_vecs.shape[1]),
            "normalized": normalized,
            "metric": "ip",
            "best_epoch": ckpt.get("epoch"),
        },
        run.path(EMBED_META),
    )
    return StageRecord(
        stage="embed",
        outputs={"items": ITEM_EMBEDDINGS, "users": USER_EMBEDDINGS, "meta": EMBED_META},
        rows={"items": len(item_ids), "users": len(users)},
    )


__all__ = ["embed_stage"]  # the stage; the rest of the module is its private machinery
