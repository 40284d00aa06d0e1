"""The one config schema of the pipeline, its YAML loader and dotted overrides.

Every section is a strict pydantic model (``extra="forbid"``, ``strict=True``): a typo in a
YAML key or an override is an error naming the key and the file it came from, and a value of
the wrong type is refused rather than coerced (``true`` is not the count 1, ``"3"`` not the
number 3; an int is accepted where a float is expected). Every count, size, rate, probability
and k carries its bounds, and settings that only fail together (e.g. ``features.history_len``
and the exported user tower) are checked here, at config time, not hours later in a stage.
Each stage receives only its own section, so a stage's config hash changes only when
something it reads changes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

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
    """Unknown keys are errors; no type coercion (no bool for an int, no text for a number)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


# numpy's RandomState (UMAP's random_state) and torch.manual_seed both take 0 <= seed < 2**32
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
PositiveInt = Annotated[int, Field(ge=1)]


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
    seed: Seed = 0  # generator seed


class DataConfig(_Strict):
    """Where the raw interactions come from and how to read them."""

    source: Literal["synthetic", "lightgcn", "movielens", "table"] = "synthetic"
    path: str | None = None  # directory (lightgcn, movielens); table: a file, or parquet parts
    # (a directory of *.parquet files or a glob), read in file-name order
    users_path: str | None = None  # table source: optional user attribute table
    items_path: str | None = None  # table source: optional item attribute table
    columns: ColumnMap = ColumnMap()  # table source: column mapping
    synthetic: SyntheticConfig = SyntheticConfig()  # synthetic source parameters
    # keep interactions with timestamp <= until (naive = UTC); ISO text accepted (--set, manifest)
    until: datetime | None = Field(None, strict=False)

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
    seed: Seed = 0  # seed for the random validation carve
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
    hidden: list[PositiveInt] = []  # MLP hidden sizes after the concat; [] = one linear layer
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
    margin: float = Field(0.1, ge=0, le=2)  # triplet: margin between pos. and neg. similarity
    ccl_margin: float = Field(0.8, ge=-1, le=1)  # ccl: negatives with cosine below this: free
    ccl_negative_weight: float | None = Field(None, ge=0)  # ccl: negative term's weight (None=1)


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
    hard_pool: int | None = Field(None, ge=1)  # candidates kept per user (None = whole window)
    hard_margin: float | None = None  # keep only negatives scoring below positive - margin
    hard_factory: str = "Flat"  # FAISS index used for mining (checked like index.factory)
    memory: int = Field(0, ge=0)  # cross-batch memory: recent item vectors as negatives (0 = off)
    memory_start_epoch: int = Field(1, ge=0)  # first epoch that scores the memory (warm-up)

    @field_validator("hard_factory")
    @classmethod
    def _hard_factory_parses(cls, value: str) -> str:
        """Reject an unparsable mining index now, not in the first mining epoch."""
        return _check_factory(value)

    @model_validator(mode="after")
    def _window(self) -> NegativesConfig:
        if self.hard and self.hard_rank_hi <= self.hard_rank_lo:
            raise ValueError("negatives.hard_rank_hi must be greater than negatives.hard_rank_lo")
        return self


class TrainConfig(_Strict):
    """Optimisation, validation and checkpointing."""

    # maximum epochs; the cosine schedule spans them (Gowalla: best epoch 16 of 20 at lr 1e-2)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(2048, ge=2)  # rows per step = in-batch negatives + 1
    lr: float = Field(1e-2, gt=0)  # AdamW peak learning rate (time-to-quality table, benchmarks/)
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay
    sampling: Literal["events", "users"] = "events"  # rows: shuffled, or a uniform user first
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: lr -> lr_min over `epochs`
    lr_min: float = Field(0.0, ge=0)  # cosine: the learning rate reached at the last epoch
    patience: int = Field(8, ge=1)  # epochs without valid improvement before stopping
    valid_k: int = Field(20, ge=1)  # validation metric is recall@valid_k
    # validate on a seeded sample of this many validation users (None: all of them); at
    # millions of users an exact validation of all of them would cost more than the epoch
    valid_users: int | None = Field(None, ge=1)
    # end an epoch after this many steps (None: one pass over the pairs); with 10^8 pairs an
    # "epoch" becomes a round of steps between validations, each with a fresh shuffle
    steps_per_epoch: int | None = Field(None, ge=1)
    seed: Seed = 0  # seed of init and batch order
    refit: bool = True  # after selection, retrain on train+valid for the best epoch count
    # torch intra-op threads on this machine, shared by its training processes (each takes
    # threads // processes on the machine); None = torch's default (1 a process under torchrun)
    threads: int | None = Field(None, ge=1)
    # float32 matmuls: "highest" = full fp32; "high"/"medium" let them run on TF32 / bf16 units
    # (GPU TF32; CPU AMX/AVX-512 bf16 via oneDNN; plain fp32 where the CPU has neither) with
    # fp32 tensors and accumulation, in training and its validation (not in evaluate)
    matmul_precision: Literal["highest", "high", "medium"] = "medium"
    # where training runs: "auto" = CUDA when torch.cuda.is_available(), else the CPU; under
    # torchrun each process takes the GPU of its LOCAL_RANK
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "bf16": forward and loss under torch.autocast(bfloat16) on CPU or CUDA (weights, gradients
    # and optimiser stay float32); "fp32": no autocast. Unlike matmul_precision, which only lets
    # float32 matmuls use bf16/TF32 units, autocast also runs elementwise ops and activations
    # in bf16; with "bf16" matmul_precision only affects what autocast leaves in float32
    precision: Literal["fp32", "bf16"] = "fp32"
    # data-parallel processes and who starts them: "local" = this machine (this process when
    # processes = 1, else torchrun --standalone starts them); "torchrun" = the same, always
    # through torchrun, and inside a job torchrun started (several machines: WORLD_SIZE set)
    # this process is one of its ranks; "ray" = `processes` Ray Train workers (TorchTrainer)
    # on the cluster of RAY_ADDRESS, or a local one. train.batch_size stays the global batch:
    # each process encodes batch_size / processes rows a step
    engine: Literal["local", "torchrun", "ray"] = "local"
    processes: int = Field(1, ge=1)
    # row-sparse table gradients + lazy (row-wise) Adam on the tables (pipeline/training/optim.py);
    # "auto": on when the embedding tables hold more than 64M parameters (and no weight decay)
    sparse_embeddings: bool | Literal["auto"] = "auto"
    progress: bool = True  # show a progress bar
    warm_start: str | None = None  # previous run dir or bundle: known ids' rows start from it

    # where and how fast training runs, not what it computes: left out of the config hash, so
    # changing them neither marks a trained model stale nor stops a resume
    UNHASHED: ClassVar[frozenset[str]] = frozenset(
        {"threads", "progress", "device", "engine", "processes"}
    )

    @model_validator(mode="after")
    def _lr_floor(self) -> TrainConfig:
        if self.batch_size % self.processes:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.processes "
                f"({self.processes}): each process encodes batch_size / processes rows a step"
            )
        if self.sparse_embeddings is True and self.weight_decay > 0:
            raise ValueError(
                f"train.weight_decay ({self.weight_decay}) needs dense table updates: "
                "train.sparse_embeddings uses a lazy Adam (RowSparseAdam) without weight decay; "
                "set one of them off"
            )
        if self.lr_schedule == "cosine" and self.lr_min > self.lr:
            raise ValueError(
                f"train.lr_min ({self.lr_min}) must not exceed train.lr ({self.lr}): the cosine "
                "schedule decays lr to lr_min"
            )
        return self


class IndexConfig(_Strict):
    """The FAISS index over all items, and the search-time setting it is served with.

    ``factory: auto`` picks by catalogue size N (``pipeline.retrieval.index.auto_factory``):
    ``Flat`` (exact) below 100k items; ``IVF{n},Flat`` with n = 4·sqrt(N) rounded to a
    multiple of 64 below 2M; ``IVF{n},PQ{d/2}x4fs,RFlat`` (fast-scan PQ + exact re-ranking) from
    2M; IVF k-means trains on at most 64 sampled vectors a list, so the build grows about
    linearly. With ``tune``, nprobe (IVF) / efSearch (HNSW) is swept on sampled user vectors and
    the smallest value whose ANN recall@tune_k reaches ``target_recall`` is saved with the index.
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
        return value.strip() if value.strip() == "auto" else _check_factory(value)


PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class AlsConfig(_Strict):
    """The ALS baseline (Hu, Koren & Volinsky, ICDM 2008; the ``implicit`` library).

    Confidence = 1 + alpha * (events of the user on the item); each (regularization, alpha)
    of the grid is fit on train and scored by valid recall@20, the best refit on train+valid.
    """

    enabled: bool = True  # run the ALS baseline in the evaluate stage
    factors: int = Field(128, ge=1)  # latent factors (fixed, not searched)
    iterations: int = Field(15, ge=1)  # ALS sweeps (users then items) per fit
    regularization: list[PositiveFloat] = Field([0.01, 0.1, 1.0], min_length=1)  # grid: L2
    alpha: list[NonNegativeFloat] = Field([1.0, 10.0], min_length=1)  # grid: confidence slope
    threads: int = Field(0, ge=0)  # implicit's num_threads; 0 = every core
    gpu: Literal["auto", "never"] = "auto"  # implicit.gpu when it has CUDA, else the CPU model


class EaseConfig(_Strict):
    """The EASE baseline (Steck, WWW 2019): B = I - P diag(1/diag P), P = (X^T X + l2 I)^-1.

    Each l2 of the grid is fit on train and scored by valid recall@20, the best refit on
    train+valid. B is a dense (items, items) float32 matrix and the fit O(items^3): above
    ``max_items`` the baseline is skipped (reason in the summary and the report).
    """

    enabled: bool = True  # run the EASE baseline in the evaluate stage
    l2: list[PositiveFloat] = Field([100.0, 500.0, 2000.0], min_length=1)  # grid: lambda
    max_items: int = Field(20000, ge=1)  # larger catalogues skip EASE (20k: 1.6 GB per matrix)


class EvalConfig(_Strict):
    """The offline evaluation protocol (DESIGN.md), its baselines, breakdowns and report."""

    ks: list[PositiveInt] = [10, 20, 50, 100]  # cut-offs of every metric@k
    batch_size: int = Field(1024, ge=1)  # users scored per batch
    # users scored: "all" with a test event, or a seeded sample (eval.seed) of this many of them
    users: Literal["all"] | int = "all"
    bootstrap: int = Field(1000, ge=0)  # resamples of the users for 95% intervals; 0 = none
    # the exact (brute-force) ranking runs only up to this many items: it costs users x items x
    # dim multiply-adds (100k users x 1M items x 256 = 2.6e13: ~8 min on 2 cores, 6x the index
    # search); above it the index figure stands alone (ANN loss: the index stage's tuning
    # sweep, on sampled queries); None = always
    exact_max_items: int | None = Field(500_000, ge=1)
    item_knn: bool = True  # run the item-kNN baseline (cosine on train+valid interactions)
    knn_neighbours: int = Field(100, ge=1)  # item-kNN: most similar items kept per item
    als: AlsConfig = AlsConfig()  # ALS baseline, hyper-parameters chosen on validation
    ease: EaseConfig = EaseConfig()  # EASE baseline, l2 chosen on validation
    activity_cuts: list[PositiveInt] = []  # most train+valid events of cold, medium; []=terciles
    popularity_shares: list[float] = [0.2, 0.5]  # catalogue shares ending head, torso (by pop)
    health_sample: int = Field(5000, ge=2)  # vectors and positive pairs drawn for align/uniform
    umap: bool = True  # 2-D UMAP map of item embeddings in the report (slow: ~30 s)
    umap_sample: int = Field(5000, ge=10)  # items drawn for the map
    seed: Seed = 0  # seed of the samples above and of UMAP's random_state

    @field_validator("users", mode="before")
    @classmethod
    def _users_all_or_count(cls, v: Any) -> Any:
        # one message for both spellings (a union would report one error per member)
        if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(
            f"must be 'all' or a number of users >= 1 to sample, got {json.dumps(v, default=str)}"
        )

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


def plain_name(value: str, what: str) -> str:
    """``value`` when it can name one directory or file inside another: not empty, not ``.`` or
    ``..``, no ``/`` or ``\\`` (so not absolute either) and no NUL. ``what`` says what it names,
    for the error (a ``ValueError``, which the loader reports with the key and the file)."""
    bad = (
        not value
        or value in (".", "..")
        or any(c in value for c in ("/", "\\", "\x00"))
        or value != value.strip()
    )
    if bad:
        raise ValueError(
            f"{value!r} must be a plain name for {what}: not empty, not '.' or '..', without "
            "'/' or '\\' and without surrounding spaces (it must not leave its directory)"
        )
    return value


class ExportConfig(_Strict):
    """The serving bundle."""

    version: str | None = None  # bundle version (a directory name); None = UTC timestamp
    onnx: bool = True  # also write the user tower as ONNX (user_tower.onnx), checked at export
    onnx_tolerance: float = Field(1e-4, gt=0)  # max |onnxruntime - torch| on the check batch
    onnx_check_rows: int = Field(512, ge=1)  # users (from row 0, the OOV row) in the check batch
    weights: bool = True  # ship model.pt (both towers' weights) so a run can warm-start from it
    # a PEM Ed25519 private key: sign the bundle's manifest (manifest.sig); None = unsigned
    signing_key: str | None = None

    @field_validator("version")
    @classmethod
    def _version_is_a_directory_name(cls, v: str | None) -> str | None:
        return None if v is None else plain_name(v, "the bundle directory export/<version>")

    @field_validator("signing_key")
    @classmethod
    def _key_is_a_path(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a PEM private key's path (leave it null for no signature)")
        return v


class TrackingConfig(_Strict):
    """MLflow tracking."""

    enabled: bool = True
    uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite in the work directory
    experiment: str = "twotower"

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        """Refuse a store MLflow has no backend for now, not when the first stage logs."""
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be empty (leave it null for $MLFLOW_TRACKING_URI)")
        scheme = tracking_scheme(value)
        if scheme not in TRACKING_SCHEMES and scheme not in _plugin_schemes():
            raise ValueError(
                f"unknown tracking store scheme {scheme!r} in {value!r}; use a local path, "
                "'file:', 'sqlite:///', 'postgresql://', 'mysql://', 'mssql://', 'http(s)://' "
                "or 'databricks'"
            )
        return value


# The tracking-store schemes MLflow 3 registers (mlflow.tracking._tracking_service.utils;
# "" = a local path, i.e. a file store); database URIs may name a driver ("postgresql+psycopg2").
TRACKING_SCHEMES = frozenset(
    {"", "file", "databricks", "databricks-uc", "uc", "http", "https"}
    | {"postgresql", "mysql", "sqlite", "mssql"}
)


def tracking_scheme(uri: str) -> str:
    """The scheme MLflow picks a tracking store by: ``""`` for a plain path (also a Windows
    drive letter), the database engine for ``engine+driver://``, else the URI's scheme."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", uri.strip())
    if match is None or len(match.group(1)) == 1:
        return ""
    return match.group(1).lower().split("+", 1)[0]


def _plugin_schemes() -> set[str]:
    """Schemes added by installed MLflow tracking-store plugins (entry points)."""
    return {ep.name for ep in entry_points(group="mlflow.tracking_store")}


def _check_factory(value: str) -> str:
    """``value`` stripped, after checking faiss can parse it as an index factory string."""
    value = value.strip()
    if value == "Flat":
        return value
    import faiss  # lazily: only configs with a non-default index pay the import

    try:
        faiss.index_factory(64, value)
    except RuntimeError as exc:
        if "could not parse" in str(exc):
            raise ValueError(
                f"faiss cannot parse index factory string {value!r}; use 'Flat', "
                "'IVF1024,Flat', 'IVF1024,PQ32x4fs,RFlat', 'HNSW32', 'IVF1024,SQ8', ... "
                "(index.factory also takes 'auto')"
            ) from None
    return value  # other errors depend on the real dimension: checked at build time


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

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, v: str) -> str:
        return plain_name(v, "the run directory <name>-<hash> and the lock file")

    @model_validator(mode="after")
    def _metric_agrees(self) -> Config:
        if self.model.normalize and self.index.metric != "ip":
            raise ValueError(
                "index.metric must be 'ip' when model.normalize is true: the towers are "
                "trained on inner products of L2-normalised vectors"
            )
        return self

    @model_validator(mode="after")
    def _history_exportable(self) -> Config:
        """The bundle's user tower is a ``torch.export`` program with a dynamic history length
        (width ``max(history_len, 1)``); torch.export specialises a length of 0 or 1, so such a
        run would train and evaluate and then fail at export. Refuse it now, saying why (the
        features stage alone handles any length >= 0)."""
        if self.features.history_len < 2:
            raise ValueError(
                f"features.history_len must be >= 2, got {self.features.history_len}: the "
                "serving bundle exports the user tower with a dynamic history length and "
                "torch.export cannot export a length of 0 or 1 (to train without the history, "
                "set model.user_history: false)"
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
    """One line naming every offending key (``model.hidden[0]``), the source and the value."""
    lines = []
    for e in err.errors():
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        if not key:  # a check across sections: its message names the keys
            lines.append(f"invalid config in {source}: {e['msg'].removeprefix('Value error, ')}")
            continue
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}' in {source}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        if value is not None and not isinstance(value, dict | list) and e["type"] != "value_error":
            msg += f" (got {json.dumps(value, default=str)})"  # YAML spelling: true, null, "3"
        lines.append(f"invalid value for '{key}' in {source}: {msg}")
    return "; ".join(lines)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading YAML 1.2 floats: ``1e-4`` and ``3e3`` are numbers.

    PyYAML implements YAML 1.1, where a float needs a dot and a signed exponent, so ``lr: 1e-4``
    would be the text "1e-4", which the strict schema (rightly) refuses as a number."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    """Parse YAML text with :class:`_YamlLoader` (config files and ``--set`` values alike)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506  (a SafeLoader subclass)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key.split("."), _yaml(raw) if raw.strip() else None


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
            loaded = _yaml(p.read_text())
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
            # a file may leave a required key to --set (configs/scale.yaml's data.path): only
            # without overrides is the file alone to blame
            if not overrides:
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
