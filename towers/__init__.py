"""The model, pure torch: the two towers and their training loss."""

from towers.losses import SampledSoftmaxLoss, log_q_from_counts
from towers.model import (
    AttrSpec,
    ItemTower,
    TowerConfig,
    TwoTower,
    UserTower,
    UserTowerExport,
    masked_mean_embedding,
)

__all__ = [
    "AttrSpec",
    "ItemTower",
    "SampledSoftmaxLoss",
    "TowerConfig",
    "TwoTower",
    "UserTower",
    "UserTowerExport",
    "log_q_from_counts",
    "masked_mean_embedding",
]
