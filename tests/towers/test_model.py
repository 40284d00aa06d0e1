"""The towers: parts, combining, config round trip, determinism and torch.export."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from towers import (
    AttrSpec,
    ItemTower,
    TowerConfig,
    TwoTower,
    UserTower,
    UserTowerExport,
    masked_mean_embedding,
)

N_USERS, N_ITEMS, DIM = 30, 25, 8
USER_ATTRS = [AttrSpec("gender", 3), AttrSpec("genres", 6, multi=True)]
ITEM_ATTRS = [AttrSpec("type", 4), AttrSpec("tags", 7, multi=True)]


def full_config(**kw) -> TowerConfig:
    base = dict(
        n_users=N_USERS, n_items=N_ITEMS, dim=DIM, user_attrs=USER_ATTRS, item_attrs=ITEM_ATTRS
    )
    return TowerConfig(**{**base, **kw})


def user_batch(b: int, h: int = 6, m: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, N_ITEMS, (b, h), generator=g)
    history[:, h // 2 :] *= torch.rand(b, h - h // 2, generator=g) < 0.5  # some padding
    return {
        "user_idx": torch.randint(0, N_USERS, (b,), generator=g),
        "history": history,
        "exclude": history[:, 0].clone(),
        "ua_gender": torch.randint(0, 3, (b,), generator=g),
        "ua_genres": torch.randint(0, 6, (b, m), generator=g),
    }


def item_batch(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "item_idx": torch.randint(0, N_ITEMS, (b,), generator=g),
        "ia_type": torch.randint(0, 4, (b,), generator=g),
        "ia_tags": torch.randint(0, 7, (b, 2), generator=g),
    }


def hand_mean(table: torch.Tensor, codes: list[int], skip: set[int]) -> torch.Tensor:
    """Mean of the table rows of ``codes`` not in ``skip``, by a Python loop; zero if none."""
    rows = [table[c] for c in codes if c not in skip]
    return torch.stack(rows).mean(0) if rows else torch.zeros(table.shape[1])


@pytest.mark.parametrize(
    "kw",
    [
        dict(combine="sum", hidden=[]),
        dict(combine="sum", hidden=[16, 12]),
        dict(combine="concat", hidden=[]),
        dict(combine="concat", hidden=[16, 12]),
        dict(combine="gated"),  # gated takes no MLP
        dict(combine="gated", gate_learnable=True),
    ],
)
@pytest.mark.parametrize("normalize", [True, False])
def test_shapes_and_unit_norm(kw, normalize):
    model = TwoTower.from_config(full_config(normalize=normalize, dropout=0.1, **kw))
    u = model.encode_users(user_batch(5))
    i = model.encode_items(item_batch(7))
    assert u.shape == (5, DIM) and i.shape == (7, DIM)
    assert u.dtype == i.dtype == torch.float32
    if normalize:
        assert torch.allclose(u.norm(dim=-1), torch.ones(5), atol=1e-6)
        assert torch.allclose(i.norm(dim=-1), torch.ones(7), atol=1e-6)
    (u.sum() + i.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_id_only_towers_are_matrix_factorisation():
    cfg = TowerConfig(n_users=N_USERS, n_items=N_ITEMS, dim=DIM, user_history=False)
    model = TwoTower.from_config(replace(cfg, normalize=False))
    users, items = torch.tensor([3, 0, 7, 3]), torch.tensor([1, 24, 5])
    u = model.encode_users({"user_idx": users})
    i = model.encode_items({"item_idx": items})
    assert torch.equal(u, model.user_tower.id_emb.weight[users])
    assert torch.equal(i, model.item_tower.id_emb.weight[items])
    assert [n for n, _ in model.named_parameters()] == [
        "item_tower.id_emb.weight",
        "user_tower.id_emb.weight",
    ]
    normed = TwoTower.from_config(cfg)
    normed.load_state_dict(model.state_dict())
    want = F.normalize(model.user_tower.id_emb.weight[users], dim=-1)
    assert torch.allclose(normed.encode_users({"user_idx": users}), want)


def test_oov_row_starts_at_zero_and_init_std():
    torch.manual_seed(0)
    model = TwoTower.from_config(
        TowerConfig(n_users=4000, n_items=3000, dim=64, share_item_embeddings=False)
    )
    for table in (model.user_tower.id_emb, model.item_tower.id_emb, model.user_tower.history_emb):
        assert torch.equal(table.weight[0], torch.zeros(64))
        assert table.weight[1:].std().item() == pytest.approx(0.1, rel=0.02)


def test_history_mean_ignores_padding_and_the_excluded_item():
    cfg = TowerConfig(n_users=N_USERS, n_items=N_ITEMS, dim=DIM, user_id=False, normalize=False)
    model = TwoTower.from_config(cfg)
    history = torch.tensor(
        [
            [3, 5, 5, 0, 0],  # the excluded item 5 appears twice: both copies go
            [3, 5, 7, 9, 0],  # excluded 9
            [4, 0, 0, 0, 0],  # excluded 4: nothing left -> zero vector
            [0, 0, 0, 0, 0],  # all padding -> zero vector
            [2, 6, 0, 0, 0],  # exclude 0 = no exclusion
            [8, 8, 1, 0, 0],  # repeats count twice
        ]
    )
    exclude = torch.tensor([5, 9, 4, 3, 0, 11])
    out = model.encode_users(
        {"user_idx": torch.zeros(6, dtype=torch.long), "history": history, "exclude": exclude}
    )
    table = model.item_tower.id_emb.weight.detach()
    for b in range(6):
        want = hand_mean(table, history[b].tolist(), {0, int(exclude[b])})
        assert torch.allclose(out[b], want, atol=1e-6), b
    assert torch.equal(out[2], torch.zeros(DIM)) and torch.equal(out[3], torch.zeros(DIM))
    # without exclude only the padding is dropped
    no_ex = model.encode_users({"user_idx": torch.zeros(6, dtype=torch.long), "history": history})
    assert torch.allclose(no_ex[0], hand_mean(table, [3, 5, 5], set()), atol=1e-6)


def test_history_shares_the_item_table_only_when_asked_and_possible():
    shared = TwoTower.from_config(full_config())
    assert shared.user_tower.history_emb is shared.item_tower.id_emb
    n_params = sum(p.numel() for p in shared.parameters())
    own = TwoTower.from_config(full_config(share_item_embeddings=False))
    assert own.user_tower.history_emb is not own.item_tower.id_emb
    assert sum(p.numel() for p in own.parameters()) == n_params + N_ITEMS * DIM
    no_item_id = TwoTower.from_config(full_config(item_id=False))  # the user tower owns it
    assert no_item_id.user_tower.history_emb.weight.shape == (N_ITEMS, DIM)
    # gradients of the history reach the shared table
    shared.encode_users(user_batch(4)).sum().backward()
    assert shared.item_tower.id_emb.weight.grad.abs().sum() > 0


def test_categorical_and_multi_valued_attributes():
    cfg = TowerConfig(
        n_users=N_USERS,
        n_items=N_ITEMS,
        dim=DIM,
        user_id=False,
        user_history=False,
        user_attrs=[AttrSpec("gender", 3)],
        item_id=False,
        item_attrs=[AttrSpec("tags", 7, multi=True)],
        normalize=False,
    )
    model = TwoTower.from_config(cfg)
    gender = torch.tensor([1, 2, 0])
    u = model.encode_users({"ua_gender": gender})
    g_table = model.user_tower.attrs.tables[0].weight
    torch.testing.assert_close(u, g_table[gender], rtol=1e-6, atol=1e-7)  # pooled vs looked up
    assert torch.equal(u[2], torch.zeros(DIM))  # code 0 = missing contributes nothing
    tags = torch.tensor([[1, 3, 0, 0], [6, 6, 2, 0], [0, 0, 0, 0], [5, 0, 5, 0]])
    i = model.encode_items({"ia_tags": tags, "item_idx": torch.zeros(4, dtype=torch.long)})
    t_table = model.item_tower.attrs.tables[0].weight.detach()
    for b in range(4):
        assert torch.allclose(i[b], hand_mean(t_table, tags[b].tolist(), {0}), atol=1e-6)


def test_sum_adds_the_parts():
    model = TwoTower.from_config(full_config(normalize=False))
    batch = user_batch(4)
    ut = model.user_tower
    table = model.item_tower.id_emb.weight.detach()
    for b in range(4):
        want = ut.id_emb.weight[batch["user_idx"][b]]
        want = want + hand_mean(table, batch["history"][b].tolist(), {0, int(batch["exclude"][b])})
        want = want + ut.attrs.tables[0].weight[batch["ua_gender"][b]]
        want = want + hand_mean(
            ut.attrs.tables[1].weight.detach(), batch["ua_genres"][b].tolist(), {0}
        )
        assert torch.allclose(model.encode_users(batch)[b], want, atol=1e-6)


def test_concat_projects_the_concatenated_parts():
    cfg = TowerConfig(
        n_users=N_USERS,
        n_items=N_ITEMS,
        dim=DIM,
        user_history=False,
        item_attrs=ITEM_ATTRS,
        combine="concat",
        normalize=False,
    )
    model = TwoTower.from_config(cfg)
    mlp = model.item_tower.combine.mlp
    assert len(mlp) == 1 and mlp[0].in_features == 3 * DIM and mlp[0].out_features == DIM
    batch = item_batch(5)
    it = model.item_tower
    parts = [it.id_emb(batch["item_idx"]), it.attrs.tables[0](batch["ia_type"])]
    parts.append(
        masked_mean_embedding(it.attrs.tables[1].weight, batch["ia_tags"], batch["ia_tags"] != 0)
    )
    want = mlp[0](torch.cat(parts, dim=-1))
    assert torch.allclose(model.encode_items(batch), want, atol=1e-6)
    # concat always projects, even a single part (the user tower here: its id)
    assert [m.in_features for m in model.user_tower.combine.mlp] == [DIM]


def test_sum_with_hidden_adds_an_mlp_and_dropout_acts_only_in_training():
    model = TwoTower.from_config(full_config(hidden=[16], dropout=0.5))
    kinds = [type(m).__name__ for m in model.user_tower.combine.mlp]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear"]
    batch = user_batch(6)
    model.eval()
    assert torch.equal(model.encode_users(batch), model.encode_users(batch))
    model.train()
    torch.manual_seed(1)
    a = model.encode_users(batch)
    assert not torch.equal(a, model.encode_users(batch))


@pytest.mark.parametrize(
    "kw",
    [
        dict(hidden=[32, 16], combine="concat", dropout=0.2),
        dict(combine="gated", gate=0.3, gate_learnable=True, history_transform=False),
        dict(combine="gated", gate=0.8),
    ],
)
def test_config_round_trips_through_asdict_and_json(kw):
    cfg = full_config(**kw)
    d = asdict(cfg)
    assert d["user_attrs"][1] == {"name": "genres", "cardinality": 6, "multi": True}
    again = json.loads(json.dumps(d))
    assert TowerConfig(**again) == cfg
    assert TowerConfig.from_dict(again) == cfg
    assert cfg.to_dict() == d
    torch.manual_seed(0)
    model = TwoTower.from_config(cfg)
    rebuilt = TwoTower.from_config(again)  # the dict form, as a checkpoint stores it
    rebuilt.load_state_dict(model.state_dict())
    model.eval()
    rebuilt.eval()
    assert torch.equal(model.encode_users(user_batch(3)), rebuilt.encode_users(user_batch(3)))
    with pytest.raises(ValueError, match="unknown TowerConfig keys.*'dimm'"):
        TowerConfig.from_dict({**again, "dimm": 3})


def test_deterministic_under_a_seed():
    def build(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return TwoTower.from_config(full_config(hidden=[16])).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(user_id=False, user_history=False, user_attrs=[]),
            "user tower has no input.*user_id",
        ),
        (dict(item_id=False, item_attrs=[]), "item tower has no input.*item_id"),
        (dict(combine="mean"), "combine must be one of"),
        (dict(dropout=1.0), "dropout"),
        (dict(hidden=[0]), "hidden"),
        (dict(user_attrs=[AttrSpec("a", 2), AttrSpec("a", 3)]), "duplicate"),
        (dict(combine="gated", user_id=False), "gated.*user_id=True and user_history=True"),
        (dict(combine="gated", user_history=False), "gated.*model.user_history"),
        (dict(combine="gated", hidden=[8]), "gated' takes no MLP.*hidden=\\[\\]"),
        (dict(gate=1.5), "gate must be in \\[0, 1\\]"),
        (dict(combine="gated", gate=1.0, gate_learnable=True), "0 < gate < 1"),
    ],
)
def test_config_errors_say_which_field(kw, match):
    with pytest.raises(ValueError, match=match):
        full_config(**kw)


def test_attr_spec_and_batch_errors():
    with pytest.raises(ValueError, match="cardinality"):
        AttrSpec("x", 0)
    model = TwoTower.from_config(full_config())
    batch = user_batch(3)
    del batch["ua_genres"]
    with pytest.raises(KeyError, match="ua_genres"):
        model.encode_users(batch)
    batch = user_batch(3)
    batch["ua_gender"] = batch["ua_gender"].unsqueeze(1)
    with pytest.raises(ValueError, match="multi=True"):
        model.encode_users(batch)


def test_user_tower_alone_owns_its_history_table():
    cfg = full_config()
    tower = UserTower(cfg)
    assert tower.history_emb.weight.shape == (N_ITEMS, DIM)
    with pytest.raises(ValueError, match="item_table has shape"):
        UserTower(cfg, item_table=torch.nn.Embedding(N_ITEMS + 1, DIM))
    assert ItemTower(cfg)(
        item_batch(2)["item_idx"],
        {"type": torch.tensor([1, 0]), "tags": torch.zeros(2, 1, dtype=torch.long)},
    ).shape == (2, DIM)


def _user_args(b: int, h: int, seed: int):
    batch = user_batch(b, h=h, seed=seed)
    attrs = {"gender": batch["ua_gender"], "genres": batch["ua_genres"]}
    return batch["user_idx"], batch["history"], attrs, batch["exclude"]


@pytest.mark.parametrize(
    "kw", [dict(hidden=[16], dropout=0.1), dict(combine="gated", gate_learnable=True)]
)
def test_export_user_tower_with_dynamic_batch_matches_eager(kw):
    torch.manual_seed(0)
    tower = TwoTower.from_config(full_config(**kw)).user_tower.eval()
    if kw.get("combine") == "gated":  # move V and g off their initial values
        with torch.no_grad():
            tower.combine.transform.weight.add_(0.1 * torch.randn(DIM, DIM))
            tower.combine.gate_logit.fill_(0.7)
    batch, hist = Dim("batch", min=1), Dim("history", min=1)
    shapes = (
        {0: batch},
        {0: batch, 1: hist},
        {"gender": {0: batch}, "genres": {0: batch}},
        {0: batch},
    )
    ep = torch.export.export(tower, _user_args(4, 6, 0), dynamic_shapes=shapes)
    served = ep.module()
    for b, h in [(11, 6), (1, 6), (3, 9), (1, 1)]:
        args = _user_args(b, h, seed=b + h)
        assert torch.allclose(served(*args), tower(*args), atol=1e-6), (b, h)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(user_history=False, user_attrs=[]),  # id only
        dict(user_id=False, user_history=False, combine="concat", hidden=[8]),  # attrs only
        dict(combine="gated"),  # SimpleX, fixed gate, attributes on the history side
        dict(combine="gated", gate_learnable=True, user_attrs=[]),  # learnable gate, no attrs
        dict(combine="gated", history_transform=False),  # V = identity
    ],
)
def test_export_flat_wrapper(kw):
    torch.manual_seed(0)
    tower = TwoTower.from_config(full_config(**kw)).user_tower.eval()
    flat = UserTowerExport(tower)
    names = flat.attr_names
    assert names == [a.name for a in kw.get("user_attrs", USER_ATTRS)]

    def flat_args(b: int, h: int, seed: int):
        user_idx, history, attrs, _ = _user_args(b, h, seed)
        return (user_idx, history, *(attrs[n] for n in names))

    ep = torch.export.export(flat, flat_args(4, 6, 0), dynamic_shapes=flat.dynamic_shapes())
    for b, h in [(1, 6), (13, 6), (2, 3)]:
        args = flat_args(b, h, b)
        want = tower(args[0], args[1], dict(zip(names, args[2:], strict=True)))
        assert torch.allclose(ep.module()(*args), want, atol=1e-6)


def test_a_few_training_steps_fit_planted_pairs():
    """Towers + loss end to end: AdamW on fixed (user, item) pairs drives the loss down."""
    from towers import SampledSoftmaxLoss

    torch.manual_seed(0)
    model = TwoTower.from_config(full_config())
    loss_fn = SampledSoftmaxLoss(temperature=0.1, learnable_temperature=True)
    opt = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=0.05)
    users = user_batch(24, seed=1)
    items = item_batch(24, seed=2)
    losses = []
    for _ in range(30):
        u, i = model(users, items)  # (24, DIM), (24, DIM)
        loss = loss_fn(u, i, items["item_idx"], user_ids=users["user_idx"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -- SimpleX gated combination ---------------------------------------------------------------
@pytest.mark.parametrize("gate", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("with_attrs", [True, False])
def test_gated_equals_a_hand_computation(gate, with_attrs):
    """g * e_u + (1 - g) * V (history mean + attributes), by hand, row by row."""
    torch.manual_seed(0)
    attrs = USER_ATTRS if with_attrs else []
    cfg = full_config(combine="gated", gate=gate, user_attrs=attrs, normalize=False)
    model = TwoTower.from_config(cfg)
    gate_mod = model.user_tower.combine
    with torch.no_grad():  # a V that is not the identity
        gate_mod.transform.weight.copy_(torch.randn(DIM, DIM))
    assert [n for n, _ in gate_mod.named_parameters()] == ["transform.weight"]  # g is fixed
    batch = user_batch(5)
    out = model.encode_users(batch)
    ut = model.user_tower
    table = model.item_tower.id_emb.weight.detach()
    V = gate_mod.transform.weight.detach()
    for b in range(5):
        e_u = ut.id_emb.weight[batch["user_idx"][b]].detach()
        h = hand_mean(table, batch["history"][b].tolist(), {0, int(batch["exclude"][b])})
        if with_attrs:
            h = h + ut.attrs.tables[0].weight[batch["ua_gender"][b]].detach()
            h = h + hand_mean(
                ut.attrs.tables[1].weight.detach(), batch["ua_genres"][b].tolist(), {0}
            )
        want = gate * e_u + (1 - gate) * (V @ h)
        assert torch.allclose(out[b], want, atol=1e-6), b
    normed = TwoTower.from_config(replace(cfg, normalize=True))
    normed.load_state_dict(model.state_dict())
    assert torch.allclose(normed.encode_users(batch), F.normalize(out, dim=-1), atol=1e-6)


def test_gated_identity_map_and_gate_one_is_the_id_embedding():
    """V = I and g = 1: the (normalised) user id embedding, whatever the history."""
    cfg = full_config(combine="gated", gate=1.0, history_transform=False, user_attrs=[])
    model = TwoTower.from_config(cfg)
    assert model.user_tower.combine.transform is None
    batch = user_batch(6)
    want = F.normalize(model.user_tower.id_emb.weight[batch["user_idx"]], dim=-1)
    assert torch.allclose(model.encode_users(batch), want, atol=1e-6)
    # the learnt V starts at the identity: same output
    with_v = TwoTower.from_config(replace(cfg, history_transform=True))
    assert torch.equal(with_v.user_tower.combine.transform.weight, torch.eye(DIM))
    with_v.load_state_dict(model.state_dict(), strict=False)
    assert torch.allclose(with_v.encode_users(batch), want, atol=1e-6)
    # g = 0, V = I: the normalised history mean alone
    hist_only = TwoTower.from_config(replace(cfg, gate=0.0))
    hist_only.load_state_dict(model.state_dict())
    table = model.item_tower.id_emb.weight.detach()
    for b in range(6):
        h = hand_mean(table, batch["history"][b].tolist(), {0, int(batch["exclude"][b])})
        got = hist_only.encode_users(batch)[b]
        assert torch.allclose(got, F.normalize(h, dim=-1), atol=1e-6), b


def test_learnable_gate_starts_at_gate_and_moves_under_an_optimizer_step():
    torch.manual_seed(0)
    model = TwoTower.from_config(full_config(combine="gated", gate=0.3, gate_learnable=True))
    gate_mod = model.user_tower.combine
    assert gate_mod.gate.item() == pytest.approx(0.3, abs=1e-6)
    assert "user_tower.combine.gate_logit" in dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = user_batch(8)
    # pull the user vectors toward their id embeddings: the gate must grow
    target = F.normalize(model.user_tower.id_emb.weight[batch["user_idx"]].detach(), dim=-1)
    before = gate_mod.gate.item()
    loss = -(model.encode_users(batch) * target).sum(-1).mean()
    loss.backward()
    assert gate_mod.gate_logit.grad is not None and gate_mod.gate_logit.grad.abs() > 0
    opt.step()
    assert gate_mod.gate.item() > before
    # a fixed gate is no parameter and does not move
    fixed = TwoTower.from_config(full_config(combine="gated", gate=0.3))
    assert not any("gate" in n for n, _ in fixed.named_parameters())
    assert fixed.user_tower.combine.gate.item() == pytest.approx(0.3)


def test_gated_item_tower_sums_its_parts():
    model = TwoTower.from_config(full_config(combine="gated", normalize=False))
    it = model.item_tower
    batch = item_batch(4)
    want = (
        it.id_emb(batch["item_idx"])
        + it.attrs.tables[0](batch["ia_type"])
        + masked_mean_embedding(it.attrs.tables[1].weight, batch["ia_tags"], batch["ia_tags"] != 0)
    )
    assert torch.allclose(model.encode_items(batch), want, atol=1e-6)


def test_config_from_a_checkpoint_without_the_gate_fields():
    """A dict saved before the gated fields existed rebuilds with their defaults."""
    d = full_config().to_dict()
    for k in ("gate", "gate_learnable", "history_transform"):
        d.pop(k)
    cfg = TowerConfig.from_dict(d)
    assert (cfg.gate, cfg.gate_learnable, cfg.history_transform) == (0.5, False, True)
    assert cfg == full_config()


# -- item audience ----------------------------------------------------------------------------
def test_audience_pools_the_user_id_table_without_the_excluded_user():
    cfg = TowerConfig(
        n_users=N_USERS, n_items=N_ITEMS, dim=DIM, item_audience=True, normalize=False
    )
    model = TwoTower(cfg)
    # one table, two towers: the audience trains the same user rows the user tower reads
    assert model.item_tower.audience_emb is model.user_tower.id_emb
    audience = torch.tensor([[3, 5, 5, 0], [7, 0, 0, 0], [2, 4, 6, 8]])
    items = torch.tensor([1, 2, 3])
    exclude = torch.tensor([5, 7, 0])  # row 1: nothing left; row 2: 0 excludes nothing
    got = model.encode_items({"item_idx": items, "audience": audience, "exclude_user": exclude})
    users = model.user_tower.id_emb.weight.detach()
    for b in range(3):
        want = model.item_tower.id_emb.weight[items[b]] + hand_mean(
            users, audience[b].tolist(), {0, int(exclude[b])}
        )
        assert torch.allclose(got[b], want, atol=1e-6), b
    # gradients reach the shared user rows through the item tower
    got.sum().backward()
    grad = model.user_tower.id_emb.weight.grad
    assert grad[[2, 3, 4, 6, 8]].abs().sum(1).gt(0).all() and grad[5].abs().sum() == 0


def test_audience_needs_the_user_id_and_its_input():
    with pytest.raises(ValueError, match="item_audience.*user_id=True"):
        TowerConfig(n_users=4, n_items=4, user_id=False, item_audience=True)
    cfg = TowerConfig(n_users=N_USERS, n_items=N_ITEMS, dim=DIM, item_audience=True)
    with pytest.raises(ValueError, match="audience is None"):
        TwoTower(cfg).encode_items({"item_idx": torch.tensor([1])})
    # a standalone item tower owns its audience table; a wrong shared one is refused
    assert ItemTower(cfg).audience_emb.weight.shape == (N_USERS, DIM)
    with pytest.raises(ValueError, match="user_table has shape"):
        ItemTower(cfg, user_table=torch.nn.Embedding(3, DIM))


def test_history_dropout_drops_entries_only_in_training():
    from towers.model import _drop_entries

    keep = torch.rand(2000, 50, generator=torch.Generator().manual_seed(1)) < 0.8
    torch.manual_seed(0)
    dropped = _drop_entries(keep, 0.3, training=True)
    assert not bool((dropped & ~keep).any())  # never revives padding / excluded entries
    assert float(dropped.sum() / keep.sum()) == pytest.approx(0.7, abs=0.01)
    assert torch.equal(_drop_entries(keep, 0.3, training=False), keep)
    # the tower: eval output ignores the dropout, train output varies with it
    cfg = full_config(history_dropout=0.5, user_attrs=[])
    model = TwoTower(cfg)
    batch = {k: v for k, v in user_batch(16, h=10).items() if not k.startswith("ua_")}
    model.eval()
    ref = TwoTower(replace(cfg, history_dropout=0.0))
    ref.load_state_dict(model.state_dict())
    ref.eval()
    assert torch.allclose(model.encode_users(batch), ref.encode_users(batch))
    model.train()
    assert not torch.allclose(model.encode_users(batch), ref.encode_users(batch))
    with pytest.raises(ValueError, match="history_dropout"):
        full_config(history_dropout=1.0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(combine="sum"),
        dict(combine="sum", hidden=[16], dropout=0.3, history_dropout=0.3),
        dict(combine="gated", item_audience=True, history_dropout=0.2),
        dict(combine="concat", hidden=[12]),
        dict(share_item_embeddings=False),  # not shared: the two encodes, nothing fused
    ],
)
@pytest.mark.parametrize("sparse", [False, True])
def test_forward_fuses_the_shared_lookups_and_equals_the_two_encodes(kw, sparse):
    """``TwoTower.forward`` looks the history means and the item ids up in one embedding_bag
    when they share the item table: the same vectors and the same gradients as
    ``encode_users`` + ``encode_items`` (float32, summed in another order: 1e-6), also with
    dropout under one seed and with sparse table gradients."""
    from towers import use_sparse_gradients

    torch.manual_seed(0)
    model = TwoTower.from_config(full_config(**kw))
    use_sparse_gradients(model, sparse)
    ub, ib = user_batch(9), item_batch(9, seed=1)
    ib["item_idx"][:3] = ub["exclude"][:3]  # some rows' item is in their history
    if kw.get("item_audience"):
        g = torch.Generator().manual_seed(2)
        ib["audience"] = torch.randint(0, N_USERS, (9, 4), generator=g)
        ib["exclude_user"] = ub["user_idx"]
    model.train()

    def run(fused: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the dropout masks
        u, i = model(ub, ib) if fused else (model.encode_users(ub), model.encode_items(ib))
        ((u * i).sum() + (u[:, :1] * i[:, 1:2]).sum()).backward()
        grads = {n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None}
        return u.detach(), i.detach(), grads

    u1, i1, g1 = run(fused=False)
    u2, i2, g2 = run(fused=True)
    assert torch.allclose(u1, u2, atol=1e-6) and torch.allclose(i1, i2, atol=1e-6)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6), name
