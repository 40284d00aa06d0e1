"""The model, pure torch: the two towers, their losses, negative samplers, frequency estimator,
item memory."""

from towers.frequency import StreamingFrequencyEstimator
from towers.losses import (
    LOSSES,
    CosineContrastiveLoss,
    SampledSoftmaxLoss,
    TripletMarginLoss,
    build_loss,
    log_q_from_counts,
    mixed_log_q,
)
from towers.memory import ItemMemory
from towers.model import (
    AttrSpec,
    ItemTower,
    TowerConfig,
    TwoTower,
    UserTower,
    UserTowerExport,
    masked_mean_embedding,
    use_sparse_gradients,
)
from towers.samplers import CatalogueSampler

__all__ = [
    "LOSSES",
    "AttrSpec",
    "CatalogueSampler",
    "CosineContrastiveLoss",
    "ItemMemory",
    "ItemTower",
    "SampledSoftmaxLoss",
    "StreamingFrequencyEstimator",
    "TowerConfig",
    "TripletMarginLoss",
    "TwoTower",
    "UserTower",
    "UserTowerExport",
    "build_loss",
    "log_q_from_counts",
    "masked_mean_embedding",
    "mixed_log_q",
    "use_sparse_gradients",
]
