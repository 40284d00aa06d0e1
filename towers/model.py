"""The two towers: a user tower and an item tower whose output inner product scores a pair.

Each tower embeds a few *parts* and combines them into one ``dim``-sized vector:

- user tower: user id, the mean of the user's recent items (its history), user attributes;
- item tower: item id, the mean of the item's recent users' id embeddings (its audience), item
  attributes.

The history and the audience pool the *other* tower's id table, so a user vector already
carries its items' embeddings and an item vector its users': one step of the neighbourhood
smoothing that graph models such as LightGCN (He et al., SIGIR 2020) get from propagation,
computed inside each tower. In training the row's own pair is left out of both means.

Every part is a ``dim``-sized vector. ``combine="sum"`` adds the parts (then an MLP and a final
``Linear(dim)`` when ``hidden`` is non-empty); ``combine="concat"`` concatenates them and always
projects back to ``dim`` through the MLP and a final ``Linear``. With one part, ``combine="sum"``
and ``hidden=[]`` a tower *is* its embedding table, so an id-only pair of towers is plain matrix
factorisation. ``combine="gated"`` is SimpleX's behaviour aggregation in the user tower (Mao et
al., "SimpleX: A Simple and Strong Baseline for Collaborative Filtering", CIKM 2021):
``g * e_u + (1 - g) * V h_u`` with e_u the user id embedding, h_u the history mean plus the
user attributes and V a learnable dim x dim map (see ``_Gate``); its item tower sums its parts.
Outputs are L2-normalised when ``normalize`` (inner product = cosine).

Conventions shared with the feature stage: row 0 of the id tables is the OOV row; code 0 of an
attribute is "missing" (single-valued) or padding (multi-valued); item 0 in a history is padding.
Everything here is pure torch: this module imports neither the pipeline nor pydantic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from towers.lookup import bag_sum, lookup_rows

COMBINES = ("sum", "concat", "gated")  # accepted values of TowerConfig.combine
USER_ATTR_PREFIX = "ua_"  # batch key of user attribute <name> is "ua_<name>"
ITEM_ATTR_PREFIX = "ia_"  # batch key of item attribute <name> is "ia_<name>"


@dataclass
class AttrSpec:
    """One categorical attribute of a user or an item."""

    name: str  # attribute name, e.g. "gender"; batch key "ua_<name>" (user) / "ia_<name>" (item)
    cardinality: int  # number of codes INCLUDING code 0 (= missing / padding)
    multi: bool = False  # multi-valued (list of codes, mean-pooled) vs one code per row

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"AttrSpec.name must be a non-empty string, got {self.name!r}")
        if int(self.cardinality) < 1:
            raise ValueError(
                f"AttrSpec '{self.name}': cardinality must be >= 1 (codes 0..cardinality-1, "
                f"0 = missing), got {self.cardinality}"
            )
        self.cardinality = int(self.cardinality)
        self.multi = bool(self.multi)


@dataclass
class TowerConfig:
    """Architecture of both towers; ``dataclasses.asdict`` of it rebuilds it (``from_dict``)."""

    n_users: int  # rows of the user id table, including OOV row 0
    n_items: int  # rows of the item id table, including OOV row 0
    dim: int = 64  # output size of both towers (and of every part)
    user_id: bool = True  # user tower: user id embedding
    user_history: bool = True  # user tower: masked mean of the history items' embeddings
    user_attrs: list[AttrSpec] = field(default_factory=list)  # user tower: attribute embeddings
    item_id: bool = True  # item tower: item id embedding
    item_attrs: list[AttrSpec] = field(default_factory=list)  # item tower: attribute embeddings
    item_audience: bool = False  # item tower: masked mean of its users' id embeddings (user_id)
    share_item_embeddings: bool = True  # history pools the item tower's id table (needs item_id)
    combine: str = "sum"  # "sum": parts summed; "concat": concat -> MLP -> Linear; "gated": SimpleX
    gate: float = 0.5  # gated: weight g of the user id embedding, 1 - g of the history side
    gate_learnable: bool = False  # gated: g = sigmoid(w), w learnt from logit(gate); False: fixed
    history_transform: bool = True  # gated: learnable dim x dim map V (init identity) on history
    history_dropout: float = 0.0  # training: drop each history / audience entry with this chance
    hidden: list[int] = field(default_factory=list)  # MLP hidden sizes (ReLU, dropout); [] = none
    dropout: float = 0.0  # dropout after each hidden ReLU of the MLP
    normalize: bool = True  # L2-normalise both towers' outputs
    init_std: float = 0.1  # std of the normal init of every embedding table (as LightGCN)

    def __post_init__(self) -> None:
        # accept the plain dicts that dataclasses.asdict produced (checkpoint round trip)
        self.user_attrs = [_as_spec(a) for a in self.user_attrs]
        self.item_attrs = [_as_spec(a) for a in self.item_attrs]
        self.hidden = [int(h) for h in self.hidden]
        if self.dim < 1:
            raise ValueError(f"TowerConfig.dim must be >= 1, got {self.dim}")
        if self.n_users < 1 or self.n_items < 1:
            raise ValueError(
                f"TowerConfig.n_users and n_items must be >= 1 (row 0 is the OOV row), "
                f"got n_users={self.n_users}, n_items={self.n_items}"
            )
        if self.combine not in COMBINES:
            raise ValueError(f"TowerConfig.combine must be one of {COMBINES}, got {self.combine!r}")
        self._check_gate()
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"TowerConfig.hidden sizes must be >= 1, got {self.hidden}")
        if not 0.0 <= self.history_dropout < 1.0:
            raise ValueError(
                f"TowerConfig.history_dropout must be in [0, 1), got {self.history_dropout}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TowerConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std <= 0:
            raise ValueError(f"TowerConfig.init_std must be > 0, got {self.init_std}")
        for side, specs in (("user_attrs", self.user_attrs), ("item_attrs", self.item_attrs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"TowerConfig.{side} has duplicate names: {names}")
        if not (self.user_id or self.user_history or self.user_attrs):
            raise ValueError(
                "the user tower has no input: set user_id=True or user_history=True, or give "
                "user_attrs (pipeline config: model.user_id, model.user_history or "
                "model.user_attributes with user attributes in the data)"
            )
        if self.item_audience and not self.user_id:
            raise ValueError(
                "item_audience pools the user tower's id embeddings: it needs user_id=True "
                "(pipeline config: model.user_id, or model.item_audience=false)"
            )
        if not (self.item_id or self.item_attrs):
            raise ValueError(
                "the item tower has no input: set item_id=True or give item_attrs "
                "(pipeline config: model.item_id, or model.item_attributes with item attributes "
                "in the data)"
            )

    def _check_gate(self) -> None:
        self.gate = float(self.gate)
        if not 0.0 <= self.gate <= 1.0:
            raise ValueError(f"TowerConfig.gate must be in [0, 1], got {self.gate}")
        if self.combine != "gated":
            return
        if not (self.user_id and self.user_history):
            raise ValueError(
                "combine='gated' mixes the user id embedding with the pooled history: it needs "
                f"user_id=True and user_history=True, got user_id={self.user_id}, "
                f"user_history={self.user_history} (pipeline config: model.user_id, "
                "model.user_history and features.history_len > 0)"
            )
        if self.hidden:
            raise ValueError(
                f"combine='gated' takes no MLP (SimpleX's user tower is the gate alone), got "
                f"hidden={self.hidden}; set hidden=[] or use combine='sum' / 'concat'"
            )
        if self.gate_learnable and not 0.0 < self.gate < 1.0:
            raise ValueError(
                f"gate_learnable=True starts from logit(gate), which needs 0 < gate < 1, got "
                f"gate={self.gate}"
            )

    @property
    def shares_item_table(self) -> bool:
        """Whether the history really pools the item tower's id table (needs item_id)."""
        return self.user_history and self.share_item_embeddings and self.item_id

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (``dataclasses.asdict``); ``TowerConfig.from_dict`` rebuilds it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TowerConfig:
        """Rebuild from ``asdict`` output; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TowerConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def _as_spec(a: AttrSpec | dict[str, Any]) -> AttrSpec:
    if isinstance(a, AttrSpec):
        return a
    if isinstance(a, dict):
        return AttrSpec(**a)
    raise TypeError(f"an attribute spec must be an AttrSpec or a dict, got {type(a).__name__}")


def _embedding(rows: int, dim: int, std: float, padding_idx: int | None = None) -> nn.Embedding:
    """A table initialised N(0, std^2) with row 0 zeroed.

    std=0.1 is LightGCN's / common MF practice: rows start with norm ~0.1*sqrt(dim), small
    enough that summed parts do not swamp each other, and the output L2 normalisation removes
    the scale anyway. Row 0 (OOV id, missing attribute code) starts at zero so an unseen id
    contributes nothing until it is trained; with ``padding_idx=0`` it stays zero.
    """
    emb = nn.Embedding(rows, dim, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.normal_(0.0, std)
        emb.weight[0].zero_()
    return emb


def _shared_table(
    table: nn.Embedding | None, name: str, rows: int, rows_name: str, cfg: TowerConfig
) -> nn.Embedding:
    """``table`` (another tower's, shared) after checking its shape, or a new own table."""
    if table is None:
        return _embedding(rows, cfg.dim, cfg.init_std)
    if tuple(table.weight.shape) != (rows, cfg.dim):
        raise ValueError(
            f"{name} has shape {tuple(table.weight.shape)}, expected "
            f"({rows_name}, dim) = ({rows}, {cfg.dim})"
        )
    return table


def _pool(
    table: nn.Embedding, idx: Tensor, exclude: Tensor | None, dropout: float, training: bool
) -> Tensor:
    """Masked mean of ``table`` rows ``idx`` (B, L) -> (B, D): padding (0) and the row's
    ``exclude`` (B,) left out, entries dropped with chance ``dropout`` while training."""
    keep = _pool_mask(idx, exclude, dropout, training)  # (B, L)
    return masked_mean_embedding(table.weight, idx, keep, sparse=table.sparse)  # (B, D)


def _pool_mask(idx: Tensor, exclude: Tensor | None, dropout: float, training: bool) -> Tensor:
    """(B, L) bool: the entries of ``idx`` (B, L) a pooled mean keeps (see :func:`_pool`)."""
    keep = idx != 0  # (B, L) padding out
    if exclude is not None:
        keep = keep & (idx != exclude.unsqueeze(1))  # (B, L)
    return _drop_entries(keep, dropout, training)  # (B, L)


def _mean_weights(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) per-entry weights of a masked mean: 1/count on kept entries, 0 elsewhere."""
    w = keep.to(dtype)  # (B, L)
    return w / w.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, L)


def _drop_entries(keep: Tensor, p: float, training: bool) -> Tensor:
    """``keep`` (B, L) with each kept entry dropped with chance ``p`` while training.

    Dropout on the pooled list itself (as the item dropout of sequential recommenders, e.g.
    Zhou et al., "S3-Rec", CIKM 2020, and the "mask" augmentation of Xie et al., "CL4SRec",
    ICDE 2022): each step the tower sees a random subset of the history, so it cannot lean
    on any single item. The masked mean renormalises over what is left; a row that loses
    everything gets a zero vector, as an empty history does. Identity in eval mode.
    """
    if not training or p == 0.0:
        return keep
    return keep & (torch.rand(keep.shape, device=keep.device) >= p)  # (B, L)


def masked_mean_embedding(
    weight: Tensor, idx: Tensor, keep: Tensor, sparse: bool = False
) -> Tensor:
    """Mean of ``weight[idx[b, l]]`` over the positions where ``keep[b, l]``; zero if none.

    weight (N, D), idx (B, L) int, keep (B, L) bool -> (B, D). One ``embedding_bag`` call: no
    (B, L, D) intermediate, and in training the sorted sparse-matrix backward of
    :mod:`towers.lookup`. ``sparse``: the gradient of ``weight`` is a sparse tensor of the
    rows used (see :func:`use_sparse_gradients`).
    """
    if idx.shape[1] == 0:  # no positions at all (e.g. history_len=0)
        return weight.new_zeros(idx.shape[0], weight.shape[1])  # (B, D)
    b, length = idx.shape
    w = _mean_weights(keep, weight.dtype)  # (B, L) each kept position: 1/count
    # flat input + explicit offsets, not the 2-D form: torch.export of the 2-D form guards
    # on B >= 2, which breaks batch-1 serving
    offsets = torch.arange(b, device=idx.device) * length  # (B,) start of each row's bag
    return bag_sum(weight, idx.reshape(-1), offsets, w.reshape(-1), sparse)  # (B, D)


def use_sparse_gradients(model: nn.Module, sparse: bool = True) -> list[nn.Parameter]:
    """Make every embedding table of ``model`` produce row-sparse gradients; returns the
    tables' weights (the parameters a sparse optimiser must own).

    A dense table gradient is a zeroed (N, D) tensor per table and step, and AdamW then
    updates every row: on Gowalla (41k + 30k rows x 256) that was about half of a step. With
    sparse gradients a step costs in proportion to the rows the batch touches (ids, history,
    audience), as TorchRec's fused row-wise optimisers do. Forward results are unchanged.
    """
    tables = []
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.sparse = sparse
            tables.append(module.weight)
    return tables


class _AttrEmbeddings(nn.Module):
    """One table per attribute; single-valued: the code's row, multi-valued: masked mean."""

    def __init__(self, specs: list[AttrSpec], dim: int, std: float, prefix: str) -> None:
        super().__init__()
        self.specs = list(specs)
        self.prefix = prefix  # only for error messages: the batch key prefix
        # a ModuleList (not a ModuleDict keyed by name): names like "type" would clash with
        # nn.Module attributes. Code 0 is padding_idx: "missing" / padding contributes zero.
        self.tables = nn.ModuleList(
            _embedding(s.cardinality, dim, std, padding_idx=0) for s in self.specs
        )

    def forward(self, attrs: dict[str, Tensor]) -> list[Tensor]:
        parts = []
        for spec, table in zip(self.specs, self.tables, strict=True):
            if spec.name not in attrs:
                raise KeyError(
                    f"attribute '{spec.name}' missing from the inputs (batch key "
                    f"'{self.prefix}{spec.name}'); got {sorted(attrs)}"
                )
            codes = attrs[spec.name]
            if spec.multi:
                if codes.dim() != 2:
                    raise ValueError(
                        f"multi-valued attribute '{spec.name}' needs (B, M) codes padded with 0, "
                        f"got shape {tuple(codes.shape)}"
                    )
                mean = masked_mean_embedding(table.weight, codes, codes != 0, table.sparse)
                parts.append(mean)  # (B, D)
            else:
                if codes.dim() != 1:
                    raise ValueError(
                        f"attribute '{spec.name}' needs one code per row (B,), got shape "
                        f"{tuple(codes.shape)}; set multi=True for a list of codes"
                    )
                parts.append(table(codes))  # (B, D)
        return parts


class _Combine(nn.Module):
    """Parts -> one vector: sum or concat, then the MLP (Linear, ReLU, Dropout)* + Linear(dim)."""

    def __init__(self, n_parts: int, cfg: TowerConfig) -> None:
        super().__init__()
        self.concat = cfg.combine == "concat"
        width = cfg.dim * n_parts if self.concat else cfg.dim
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = h
        if self.concat or cfg.hidden:
            layers.append(nn.Linear(width, cfg.dim))
        self.mlp = nn.Sequential(*layers)  # empty: identity (sum of parts as is)

    def forward(self, parts: list[Tensor]) -> Tensor:
        if self.concat:
            x = torch.cat(parts, dim=-1)  # (B, n_parts * D)
        else:
            x = parts[0]
            for p in parts[1:]:
                x = x + p  # (B, D)
        return self.mlp(x)  # (B, D)


class _Gate(nn.Module):
    """SimpleX's behaviour aggregation: ``g * e_u + (1 - g) * V h_u`` -> (B, dim).

    Mao et al., "SimpleX: A Simple and Strong Baseline for Collaborative Filtering" (CIKM 2021),
    behaviour aggregation layer: the user vector mixes the user's id embedding e_u with a
    linear map V of the aggregated behaviour h_u (here the masked mean of the history items,
    plus the user attribute embeddings when there are any: they describe the user's content
    side, so they join the history rather than the id). g is the paper's weighting
    hyper-parameter (``gate``), or, with ``gate_learnable``, ``sigmoid(w)`` with w a scalar
    parameter starting at ``logit(gate)``. V (``history_transform``) is a
    ``Linear(dim, dim, bias=False)`` initialised to the identity, so training starts from the
    plain mix of id and mean history with both sides on the same scale; without it V = I.
    """

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.transform: nn.Linear | None = None
        if cfg.history_transform:
            self.transform = nn.Linear(cfg.dim, cfg.dim, bias=False)
            with torch.no_grad():
                self.transform.weight.copy_(torch.eye(cfg.dim))
        self.fixed_gate = float(cfg.gate)
        self.gate_logit: nn.Parameter | None = None
        if cfg.gate_learnable:
            g = cfg.gate
            self.gate_logit = nn.Parameter(torch.tensor(math.log(g / (1.0 - g))))

    @property
    def gate(self) -> Tensor:
        """The current g, a 0-dim tensor (differentiable when learnable)."""
        if self.gate_logit is not None:
            return torch.sigmoid(self.gate_logit)
        return torch.tensor(self.fixed_gate)

    def forward(self, user_vec: Tensor, history_vec: Tensor) -> Tensor:
        """user_vec (B, D) e_u; history_vec (B, D) h_u -> (B, D)."""
        h = self.transform(history_vec) if self.transform is not None else history_vec  # (B, D)
        # fixed: a Python float (exports as a constant); learnable: a () tensor in (0, 1)
        g = self.fixed_gate if self.gate_logit is None else torch.sigmoid(self.gate_logit)
        return g * user_vec + (1.0 - g) * h  # (B, D)

    def extra_repr(self) -> str:
        if self.gate_logit is None:
            return f"gate={self.fixed_gate} (fixed)"
        return f"gate={float(self.gate):.4g} (learnable, from {self.fixed_gate})"


class UserTower(nn.Module):
    """User id + mean of the history items + user attributes -> (B, dim).

    The parts are combined as ``cfg.combine`` says; ``"gated"``: ``_Gate`` of the id embedding
    and the history side (history mean + attributes).

    ``item_table``: the item tower's id table to pool the history from (``TwoTower`` passes it
    when ``cfg.share_item_embeddings`` and ``cfg.item_id``); when None and the history is on,
    the user tower owns its own (n_items, dim) history table. ``id_table``: the user id table
    when it is shared with the item tower's audience (``TwoTower`` passes it); None: own one.
    """

    def __init__(
        self,
        cfg: TowerConfig,
        item_table: nn.Embedding | None = None,
        id_table: nn.Embedding | None = None,
    ) -> None:
        super().__init__()
        self.dim = cfg.dim
        self.normalize = cfg.normalize
        self.attr_names = [s.name for s in cfg.user_attrs]
        self.history_dropout = cfg.history_dropout
        self.id_emb = None
        if cfg.user_id:
            self.id_emb = _shared_table(id_table, "id_table", cfg.n_users, "n_users", cfg)
        self.history_emb: nn.Embedding | None = None
        if cfg.user_history:
            self.history_emb = _shared_table(item_table, "item_table", cfg.n_items, "n_items", cfg)
        self.attrs = _AttrEmbeddings(cfg.user_attrs, cfg.dim, cfg.init_std, USER_ATTR_PREFIX)
        n_parts = int(cfg.user_id) + int(cfg.user_history) + len(cfg.user_attrs)
        self.gated = cfg.combine == "gated"
        # gated: parts are [id, history, *attrs]; the config guarantees id and history are on
        self.combine: nn.Module = _Gate(cfg) if self.gated else _Combine(n_parts, cfg)

    def forward(
        self,
        user_idx: Tensor | None,
        history: Tensor | None = None,
        attrs: dict[str, Tensor] | None = None,
        exclude: Tensor | None = None,
        history_vec: Tensor | None = None,
    ) -> Tensor:
        """Encode users.

        user_idx (B,) int64; history (B, H) int64 item ids, 0 = padding; attrs name -> (B,)
        codes (single-valued) or (B, M) codes padded with 0 (multi-valued); exclude (B,) int64:
        an item left out of row b's history mean (training passes the row's positive, so the
        tower cannot copy its target from the history). A row whose history is empty after
        masking gets a zero history vector. ``history_vec`` (B, dim): the pooled history,
        already computed (:meth:`TwoTower.forward` pools it with the item lookup). Returns
        (B, dim).
        """
        parts: list[Tensor] = []
        if self.id_emb is not None:
            if user_idx is None:
                raise ValueError("the user tower has user_id=True but user_idx is None")
            parts.append(lookup_rows(self.id_emb, user_idx))  # (B, D)
        if self.history_emb is not None and history_vec is not None:
            parts.append(history_vec)  # (B, D)
        elif self.history_emb is not None:
            if history is None:
                raise ValueError("the user tower has user_history=True but history is None")
            parts.append(  # (B, D) the positive out of the mean
                _pool(self.history_emb, history, exclude, self.history_dropout, self.training)
            )
        if self.attr_names:
            parts.extend(self.attrs(attrs or {}))  # each (B, D)
        if self.gated:
            history_side = parts[1]
            for p in parts[2:]:  # user attributes join the history side
                history_side = history_side + p  # (B, D)
            x = self.combine(parts[0], history_side)  # (B, D)
        else:
            x = self.combine(parts)  # (B, D)
        return F.normalize(x, dim=-1) if self.normalize else x  # (B, D)


class ItemTower(nn.Module):
    """Item id + mean of the audience's user embeddings + item attributes -> (B, dim).

    With ``combine="gated"`` the parts are summed. ``user_table``: the user tower's id table
    the audience pools (``TwoTower`` passes it); when None and the audience is on, the tower
    owns its own (n_users, dim) audience table.
    """

    def __init__(self, cfg: TowerConfig, user_table: nn.Embedding | None = None) -> None:
        super().__init__()
        self.dim = cfg.dim
        self.normalize = cfg.normalize
        self.attr_names = [s.name for s in cfg.item_attrs]
        self.history_dropout = cfg.history_dropout
        self.id_emb = _embedding(cfg.n_items, cfg.dim, cfg.init_std) if cfg.item_id else None
        self.audience_emb: nn.Embedding | None = None
        if cfg.item_audience:
            self.audience_emb = _shared_table(user_table, "user_table", cfg.n_users, "n_users", cfg)
        self.attrs = _AttrEmbeddings(cfg.item_attrs, cfg.dim, cfg.init_std, ITEM_ATTR_PREFIX)
        n_parts = int(cfg.item_id) + int(cfg.item_audience) + len(cfg.item_attrs)
        self.combine = _Combine(n_parts, cfg)

    def forward(
        self,
        item_idx: Tensor | None,
        attrs: dict[str, Tensor] | None = None,
        audience: Tensor | None = None,
        exclude_user: Tensor | None = None,
        id_vec: Tensor | None = None,
    ) -> Tensor:
        """Encode items.

        item_idx (B,) int64; attrs as for UserTower; audience (B, A) int64 user rows, 0 =
        padding; exclude_user (B,) int64: a user left out of row b's audience mean (training
        passes the row's user, as the user tower leaves the positive out of the history).
        ``id_vec`` (B, dim): the id embeddings, already looked up (:meth:`TwoTower.forward`).
        Returns (B, dim).
        """
        parts: list[Tensor] = []
        if self.id_emb is not None and id_vec is not None:
            parts.append(id_vec)  # (B, D)
        elif self.id_emb is not None:
            if item_idx is None:
                raise ValueError("the item tower has item_id=True but item_idx is None")
            parts.append(lookup_rows(self.id_emb, item_idx))  # (B, D)
        if self.audience_emb is not None:
            if audience is None:
                raise ValueError("the item tower has item_audience=True but audience is None")
            parts.append(  # (B, D) the row's own user out of the mean
                _pool(
                    self.audience_emb, audience, exclude_user, self.history_dropout, self.training
                )
            )
        if self.attr_names:
            parts.extend(self.attrs(attrs or {}))  # each (B, D)
        x = self.combine(parts)  # (B, D)
        return F.normalize(x, dim=-1) if self.normalize else x  # (B, D)


class UserTowerExport(nn.Module):
    """The user tower with plain positional tensors, for ``torch.export`` / serving.

    ``forward(user_idx, history, *attrs)``: user_idx (B,), history (B, H) (ignored when the
    tower has no history; pass zeros (B, 1) then), then one tensor per user attribute in
    ``attr_names`` order (the order of ``TowerConfig.user_attrs``). No ``exclude``: serving
    never hides an item from the history. ``UserTower.forward`` with its dict of attributes
    exports as well; this wrapper is for callers that want a flat signature. Export it with
    ``torch.export.export(w, (user_idx, history, *attrs), dynamic_shapes=w.dynamic_shapes())``;
    the example batch must have at least 2 rows (export specialises sizes 0 and 1), the
    exported program then accepts any batch >= 1.
    """

    def __init__(self, tower: UserTower) -> None:
        super().__init__()
        self.tower = tower
        self.attr_names = list(tower.attr_names)

    def dynamic_shapes(self) -> tuple[Any, ...]:
        """``dynamic_shapes`` for ``torch.export.export(self, args, dynamic_shapes=...)``.

        The batch is dynamic (>= 1, shared by every input), so are the history length (>= 1;
        also when the tower ignores the history) and the length of each multi-valued attribute.
        """
        from torch.export import Dim

        batch = Dim("batch", min=1)
        history = {0: batch, 1: Dim("history", min=1)}
        attrs = tuple(
            {0: batch, 1: Dim(f"attr{k}_len", min=1)} if spec.multi else {0: batch}
            for k, spec in enumerate(self.tower.attrs.specs)
        )
        return ({0: batch}, history, attrs) if attrs else ({0: batch}, history)

    def forward(self, user_idx: Tensor, history: Tensor, *attrs: Tensor) -> Tensor:
        if len(attrs) != len(self.attr_names):
            raise ValueError(f"expected {len(self.attr_names)} attributes {self.attr_names}")
        return self.tower(user_idx, history, dict(zip(self.attr_names, attrs, strict=True)))


class TwoTower(nn.Module):
    """Both towers; ``encode_users`` / ``encode_items`` read the batch dicts of the data stage.

    User batch keys: "user_idx" (B,), "history" (B, H), optional "exclude" (B,), "ua_<name>".
    Item batch keys: "item_idx" (B,), "audience" (B, A), optional "exclude_user" (B,),
    "ia_<name>". Extra keys are ignored.
    """

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.config = cfg
        # the audience pools the user tower's id table: made here, handed to both towers
        user_ids = _embedding(cfg.n_users, cfg.dim, cfg.init_std) if cfg.item_audience else None
        self.item_tower = ItemTower(cfg, user_table=user_ids)
        shared = self.item_tower.id_emb if cfg.shares_item_table else None
        self.user_tower = UserTower(cfg, item_table=shared, id_table=user_ids)

    @classmethod
    def from_config(cls, cfg: TowerConfig | dict[str, Any]) -> TwoTower:
        """Build from a TowerConfig or its ``asdict`` dict (as a checkpoint stores it)."""
        return cls(cfg if isinstance(cfg, TowerConfig) else TowerConfig.from_dict(cfg))

    def encode_users(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, dim) user vectors from a user batch dict."""
        attrs = _attrs_from_batch(batch, self.user_tower.attr_names, USER_ATTR_PREFIX)
        return self.user_tower(
            batch.get("user_idx"), batch.get("history"), attrs, batch.get("exclude")
        )

    def encode_items(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, dim) item vectors from an item batch dict."""
        attrs = _attrs_from_batch(batch, self.item_tower.attr_names, ITEM_ATTR_PREFIX)
        return self.item_tower(
            batch.get("item_idx"), attrs, batch.get("audience"), batch.get("exclude_user")
        )

    def forward(
        self, user_batch: dict[str, Tensor], item_batch: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(user vectors (B, dim), item vectors (B, dim)) of a training batch; one call, as
        DDP wants.

        The same vectors as :meth:`encode_users` and :meth:`encode_items`. When the history
        pools the item table (``shares_item_table``), the history means and the rows' item
        ids are looked up in one ``embedding_bag`` call, so the backward writes one dense
        (n_items, dim) table gradient instead of two that are then added: on Gowalla's
        tables that saves writing and adding a second 42 MB gradient every step.
        """
        history, item_idx = user_batch.get("history"), item_batch.get("item_idx")
        if not self.config.shares_item_table or history is None or item_idx is None:
            return self.encode_users(user_batch), self.encode_items(item_batch)
        table = self.item_tower.id_emb
        assert table is not None  # shares_item_table implies item_id
        tower = self.user_tower
        keep = _pool_mask(
            history, user_batch.get("exclude"), tower.history_dropout, self.training
        )  # (B, L)
        history_vec, id_vec = _bags_and_rows(table, history, keep, item_idx)  # (B, D) each
        user_attrs = _attrs_from_batch(user_batch, tower.attr_names, USER_ATTR_PREFIX)
        users = tower(
            user_batch.get("user_idx"), None, user_attrs, history_vec=history_vec
        )  # (B, D)
        item_attrs = _attrs_from_batch(item_batch, self.item_tower.attr_names, ITEM_ATTR_PREFIX)
        items = self.item_tower(
            item_idx,
            item_attrs,
            item_batch.get("audience"),
            item_batch.get("exclude_user"),
            id_vec=id_vec,
        )  # (B, D)
        return users, items


def _bags_and_rows(
    table: nn.Embedding, idx: Tensor, keep: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """The masked means of ``table`` rows ``idx`` (B, L) (``keep`` (B, L)) and the rows
    ``rows`` (M,) themselves, in one ``embedding_bag`` call: bags 0..B-1 are the means, bags
    B..B+M-1 one row each with weight 1. Returns ((B, D), (M, D))."""
    b, length = idx.shape
    m = rows.shape[0]
    w = _mean_weights(keep, table.weight.dtype).reshape(-1)  # (B*L,)
    flat = torch.cat([idx.reshape(-1), rows])  # (B*L + M,)
    weights = torch.cat([w, w.new_ones(m)])  # (B*L + M,)
    starts = torch.arange(b + m, device=idx.device)  # (B + M,)
    offsets = torch.where(starts < b, starts * length, b * length + (starts - b))  # (B + M,)
    out = bag_sum(table.weight, flat, offsets, weights, table.sparse)  # (B + M, D)
    return out[:b], out[b:]


def _attrs_from_batch(batch: dict[str, Tensor], names: list[str], prefix: str) -> dict:
    missing = [prefix + n for n in names if prefix + n not in batch]
    if missing:
        raise KeyError(f"batch lacks attribute keys {missing}; it has {sorted(batch)}")
    return {n: batch[prefix + n] for n in names}
