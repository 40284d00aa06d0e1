"""The one config schema of the pipeline, its YAML loader and dotted overrides.

Every section is a strict pydantic model (``extra="forbid"``): a typo in a YAML key or an
override is an error naming the key and the file it came from. Each stage receives only its
own section, so a stage's config hash changes only when something it reads changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnMap(_Strict):
    """Column names of a generic interactions table (parquet or CSV)."""

    user: str = "user"  # raw user id column
    item: str = "item"  # raw item id column
    timestamp: str | None = "timestamp"  # event time (int seconds or datetime); None = no time
    weight: str | None = None  # optional interaction weight column


class SyntheticConfig(_Strict):
    """The embedded default data set: planted user/item clusters and skewed popularity."""

    n_users: int = Field(2000, ge=10)  # number of users
    n_items: int = Field(1000, ge=10)  # number of items
    n_clusters: int = Field(10, ge=1)  # taste clusters shared by users and items
    mean_interactions: float = Field(30.0, gt=1)  # mean interactions per user (geometric)
    in_cluster: float = Field(0.8, ge=0, le=1)  # share of a user's items from its own cluster
    popularity_exponent: float = Field(1.0, ge=0)  # Zipf exponent of item popularity
    seed: int = 0  # generator seed


class DataConfig(_Strict):
    """Where the raw interactions come from and how to read them."""

    source: Literal["synthetic", "lightgcn", "movielens", "table"] = "synthetic"
    path: str | None = None  # directory (lightgcn, movielens) or file (table)
    users_path: str | None = None  # table source: optional user attribute table
    items_path: str | None = None  # table source: optional item attribute table
    columns: ColumnMap = ColumnMap()  # table source: column mapping
    synthetic: SyntheticConfig = SyntheticConfig()  # synthetic source parameters
    until: datetime | None = None  # keep interactions with timestamp <= until (naive = UTC)

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        return self


class FeaturesConfig(_Strict):
    """Vocabularies, splits, histories and attribute encodings."""

    split: Literal["given", "time", "leave_last_n"] = "leave_last_n"  # how test is chosen
    test_fraction: float = Field(0.2, gt=0, lt=1)  # time split: share of latest events
    leave_last_n: int = Field(2, ge=1)  # leave_last_n split: test events per user
    valid_fraction: float = Field(0.1, ge=0, lt=1)  # share of each user's train carved out
    valid_strategy: Literal["random", "last"] = "random"  # which train events go to valid
    history_len: int = Field(50, ge=0)  # last N train items kept as the user's history
    audience_len: int = Field(50, ge=0)  # last N users of each item kept as its audience
    seed: int = 0  # seed for the random validation carve
    vocab_from: str | None = None  # previous run dir or bundle: old ids keep their rows


class ModelConfig(_Strict):
    """Which parts the towers have; an id-only pair of towers is plain MF."""

    dim: int = Field(256, ge=2)  # output embedding size (the Gowalla ablation picked 256)
    user_id: bool = True  # user id embedding
    user_history: bool = True  # mean-pooled embeddings of the user's recent items
    user_attributes: bool = True  # user attribute embeddings
    item_id: bool = True  # item id embedding
    item_attributes: bool = True  # item attribute embeddings
    item_audience: bool = False  # mean-pooled user id embeddings of the item's recent users
    share_item_embeddings: bool = True  # history uses the item tower's id table
    combine: Literal["sum", "concat", "gated"] = "sum"  # sum parts; concat+project; SimpleX gate
    gate: float = Field(0.5, ge=0, le=1)  # gated: weight g of the id embedding (1-g: history)
    gate_learnable: bool = False  # gated: learn g (a sigmoid of a scalar) instead of fixing it
    history_transform: bool = True  # gated: a learnable dim x dim map V on the pooled history
    history_dropout: float = Field(0.0, ge=0, lt=1)  # training: drop history/audience entries
    hidden: list[int] = []  # MLP hidden sizes after the concat; [] = one linear layer
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout inside the MLP
    normalize: bool = True  # L2-normalise both towers' outputs (cosine / inner product)


class LossConfig(_Strict):
    """The contrastive loss (see towers.losses for the papers)."""

    name: Literal["softmax", "triplet", "ccl"] = "softmax"  # InfoNCE, triplet margin, SimpleX CCL
    temperature: float = Field(0.08, gt=0)  # softmax: logits are divided by this
    learnable_temperature: bool = False  # softmax: learn the temperature (from `temperature`)
    logq: bool = True  # softmax: subtract log sampling probability of each candidate
    logq_source: Literal["counts", "streaming"] = "counts"  # train counts or streaming estimate
    logq_weight: float = Field(1.0, ge=0)  # softmax: subtract logq_weight * log q (1 = Yi et al.)
    margin: float = 0.1  # triplet: margin between positive and negative similarity
    ccl_margin: float = 0.8  # ccl: negatives with cosine below this cost nothing
    ccl_negative_weight: float | None = None  # ccl: weight of the negative term (None = 1)


class NegativesConfig(_Strict):
    """Where negatives come from: in-batch, shared sampled (mixed) and mined hard ones."""

    in_batch: bool = True  # the other rows' positives are the negatives
    mask_accidental_hits: bool = True  # a row's own positive / same user's rows never negatives
    mixed: int = Field(0, ge=0)  # shared negatives sampled from the catalogue per batch (0 = off)
    mixed_alpha: float = Field(0.0, ge=0)  # mixed sampler: popularity^alpha (0 = uniform)
    hard: int = Field(0, ge=0)  # mined hard negatives per row (0 = off)
    hard_every: int = Field(1, ge=1)  # re-mine every N epochs
    hard_start_epoch: int = Field(1, ge=0)  # first epoch that uses mined negatives
    hard_rank_lo: int = Field(10, ge=0)  # mined window: ranks [lo, hi) among non-positives
    hard_rank_hi: int = Field(100, ge=1)
    hard_pool: int | None = None  # candidates kept per user (None = the whole window)
    hard_margin: float | None = None  # keep only negatives scoring below positive - margin
    hard_factory: str = "Flat"  # FAISS index used for mining
    memory: int = Field(0, ge=0)  # cross-batch memory: recent item vectors as negatives (0 = off)
    memory_start_epoch: int = Field(1, ge=0)  # first epoch that scores the memory (warm-up)

    @model_validator(mode="after")
    def _window(self) -> NegativesConfig:
        if self.hard and self.hard_rank_hi <= self.hard_rank_lo:
            raise ValueError("negatives.hard_rank_hi must be greater than negatives.hard_rank_lo")
        return self


class TrainConfig(_Strict):
    """Optimisation, validation and checkpointing."""

    epochs: int = Field(40, ge=1)  # maximum epochs (early stopping usually ends sooner)
    batch_size: int = Field(2048, ge=2)  # rows per step = in-batch negatives + 1
    lr: float = Field(3e-3, gt=0)  # AdamW learning rate
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay
    sampling: Literal["events", "users"] = "events"  # rows: shuffled, or a uniform user first
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: lr -> lr_min over `epochs`
    lr_min: float = Field(0.0, ge=0)  # cosine: the learning rate reached at the last epoch
    patience: int = Field(8, ge=1)  # epochs without valid improvement before stopping
    valid_k: int = Field(20, ge=1)  # validation metric is recall@valid_k
    seed: int = 0  # seed of init and batch order
    refit: bool = True  # after selection, retrain on train+valid for the best epoch count
    threads: int | None = None  # torch intra-op threads; None = torch's default
    progress: bool = True  # show a progress bar
    warm_start: str | None = None  # previous run dir or bundle: known ids' rows start from it


class IndexConfig(_Strict):
    """The FAISS index over all items, and the search-time setting it is served with.

    ``factory: auto`` picks by catalogue size N (``pipeline.retrieval.index.auto_factory``):
    ``Flat`` (exact) below 100k items; ``IVF{n},Flat`` with n = 4·sqrt(N) rounded to a power of two
    below 2M; ``IVF{n},PQ{d/2}x4fs,RFlat`` (fast-scan PQ + exact re-ranking) from 2M. With
    ``tune``, nprobe (IVF) / efSearch (HNSW) is swept on sampled user vectors and the smallest
    value whose ANN recall@tune_k reaches ``target_recall`` is saved with the index.
    """

    factory: str = "auto"  # faiss.index_factory string ("Flat", "IVF1024,Flat", "HNSW32", ...)
    metric: Literal["ip", "l2"] = "ip"  # must agree with model.normalize / training
    gpu: Literal["auto", "never"] = "auto"  # move to GPU(s) when faiss reports any
    gpu_mode: Literal["replicate", "shard"] = "replicate"  # several GPUs: copy on each / split
    gpu_fp16: bool = False  # GPU: store vectors in float16 (half the memory)
    nprobe: int | None = Field(None, ge=1)  # IVF lists probed; set = fixed, wins over tuning
    ef_search: int | None = Field(None, ge=1)  # HNSW efSearch; set = fixed, wins over tuning
    refine_k_factor: float | None = Field(None, ge=1)  # "...,RFlat": re-rank k_factor*k; None=16
    tune: bool = True  # sweep nprobe / efSearch, keep the cheapest meeting target_recall
    target_recall: float = Field(0.99, gt=0, le=1)  # ANN recall@tune_k vs exact search
    tune_k: int = Field(20, ge=1)  # k of the ANN recall used for tuning
    tune_queries: int = Field(1000, ge=1)  # user vectors sampled as tuning queries

    @field_validator("factory")
    @classmethod
    def _factory_parses(cls, value: str) -> str:
        """Reject a factory string faiss cannot parse now, not after hours of training."""
        value = value.strip()
        if value in ("auto", "Flat"):
            return value
        import faiss  # lazily: only configs with a non-default index pay the import

        try:
            faiss.index_factory(64, value)
        except RuntimeError as exc:
            if "could not parse" in str(exc):
                raise ValueError(
                    f"faiss cannot parse index factory string {value!r}; use 'auto', 'Flat', "
                    "'IVF1024,Flat', 'IVF1024,PQ32x4fs,RFlat', 'HNSW32', 'IVF1024,SQ8', ..."
                ) from None
        return value  # other errors depend on the real dimension: checked at build time


class EvalConfig(_Strict):
    """The offline evaluation protocol (DESIGN.md), its baselines, breakdowns and report."""

    ks: list[int] = [10, 20, 50, 100]  # cut-offs of every metric@k
    batch_size: int = Field(1024, ge=1)  # users scored per batch
    item_knn: bool = True  # run the item-kNN baseline (cosine on train+valid interactions)
    knn_neighbours: int = Field(100, ge=1)  # item-kNN: most similar items kept per item
    activity_cuts: list[int] = []  # most train+valid events of cold, medium users; [] = terciles
    popularity_shares: list[float] = [0.2, 0.5]  # catalogue shares ending head, torso (by pop)
    health_sample: int = Field(5000, ge=2)  # vectors and positive pairs drawn for align/uniform
    umap: bool = True  # 2-D UMAP map of item embeddings in the report (slow: ~30 s)
    umap_sample: int = Field(5000, ge=10)  # items drawn for the map
    seed: int = 0  # seed of the samples above and of UMAP's random_state

    @model_validator(mode="after")
    def _ks_positive(self) -> EvalConfig:
        if not self.ks or min(self.ks) < 1:
            raise ValueError("eval.ks must be a non-empty list of positive integers")
        self.__dict__["ks"] = sorted(set(self.ks))
        cuts = self.activity_cuts
        if cuts and (len(cuts) != 2 or not 1 <= cuts[0] < cuts[1]):
            raise ValueError(
                "eval.activity_cuts must be [] (terciles) or two increasing counts >= 1, "
                "e.g. [10, 50]: cold <= 10 < medium <= 50 < heavy"
            )
        shares = self.popularity_shares
        if len(shares) != 2 or not 0 < shares[0] < shares[1] <= 1:
            raise ValueError(
                "eval.popularity_shares must be two increasing shares in (0, 1], "
                "e.g. [0.2, 0.5]: head = top 20% of items, torso = next 30%"
            )
        return self


class ExportConfig(_Strict):
    """The serving bundle."""

    version: str | None = None  # bundle version; None = UTC timestamp
    onnx: bool = True  # also write the user tower as ONNX (user_tower.onnx), checked at export
    onnx_tolerance: float = Field(1e-4, gt=0)  # max |onnxruntime - torch| on the check batch
    onnx_check_rows: int = Field(512, ge=1)  # users (from row 0, the OOV row) in the check batch
    weights: bool = True  # ship model.pt (both towers' weights) so a run can warm-start from it


class TrackingConfig(_Strict):
    """MLflow tracking."""

    enabled: bool = True
    uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite in the work directory
    experiment: str = "twotower"


class RegistryConfig(_Strict):
    """The MLflow Model Registry and the champion gate (:mod:`pipeline.release.gate`).

    After export, the new bundle is registered as a new version of ``model_name`` in the store
    of ``tracking:`` and gets ``alias`` only if its ``metric`` on the run's test split is at
    least the current champion's (scored on the same split) minus ``tolerance``.
    """

    enabled: bool = False  # run the gate after export in the retrain flow
    model_name: str = "twotower"  # registered model name
    alias: str = "champion"  # the alias the gate moves (models:/<model_name>@<alias>)
    challenger_alias: str | None = "challenger"  # alias of the latest refused version; None=none
    metric: str = "recall@20"  # "recall@k" or "ndcg@k", on the run's test split
    tolerance: float = Field(0.0, ge=0)  # absolute: promote if new >= champion - tolerance

    @field_validator("metric")
    @classmethod
    def _metric_form(cls, value: str) -> str:
        name, _, k = value.strip().partition("@")
        if name not in ("recall", "ndcg") or not k.isdigit() or int(k) < 1:
            raise ValueError(f"expected 'recall@k' or 'ndcg@k' with k >= 1, got {value!r}")
        return f"{name}@{int(k)}"

    @model_validator(mode="after")
    def _aliases_differ(self) -> RegistryConfig:
        if self.challenger_alias is not None and self.challenger_alias == self.alias:
            raise ValueError("registry.challenger_alias must differ from registry.alias")
        return self


class Config(_Strict):
    """The whole pipeline's configuration."""

    name: str = "default"  # a label for runs of this config
    data: DataConfig = DataConfig()
    features: FeaturesConfig = FeaturesConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    negatives: NegativesConfig = NegativesConfig()
    train: TrainConfig = TrainConfig()
    index: IndexConfig = IndexConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()

    @model_validator(mode="after")
    def _metric_agrees(self) -> Config:
        if self.model.normalize and self.index.metric != "ip":
            raise ValueError(
                "index.metric must be 'ip' when model.normalize is true: the towers are "
                "trained on inner products of L2-normalised vectors"
            )
        return self


@dataclass(frozen=True)
class TrainSpec:
    """The part of the config the train stage reads: the model, loss, negatives and train
    sections (the checkpoint records their hash, so a resume refuses changed values)."""

    model: ModelConfig
    loss: LossConfig
    negatives: NegativesConfig
    train: TrainConfig

    @classmethod
    def of(cls, cfg: Config) -> TrainSpec:
        return cls(cfg.model, cfg.loss, cfg.negatives, cfg.train)

    @staticmethod
    def sections() -> tuple[str, ...]:
        return tuple(f.name for f in fields(TrainSpec))


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}' in {source}")
        else:
            lines.append(f"invalid value for '{key}' in {source}: {e['msg']}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` override in a nested dict (a copy is returned)."""
    out = json.loads(json.dumps(raw, default=str))  # YAML datetimes (data.until) -> ISO text
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides.

    Errors name the offending key and where it came from (the file or ``--set``).
    """
    raw: dict[str, Any] = {}
    source = "the defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        raw = loaded
        try:
            Config.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, source)) from None
    return resolve_config(raw, overrides or [], source)


def resolve_config(raw: dict[str, Any], overrides: list[str], source: str) -> Config:
    """Validate a raw config mapping after applying dotted overrides; errors name ``source``."""
    if overrides:
        raw = apply_overrides(raw, overrides)
        source = f"{source} with --set {' '.join(overrides)}"
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, every field present."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


if __name__ == "__main__":  # `python -m pipeline.core.config > configs/default.yaml` (header aside)
    print(dump_config(Config()), end="")
