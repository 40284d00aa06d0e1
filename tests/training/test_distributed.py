"""Data-parallel training: 2 processes (torchrun, or Ray Train on a local Ray cluster; gloo, CPU)
with batch B/2 each compute what 1 process with batch B computes; device and precision settings.

The 2-process side runs this file as a torchrun script (``_worker`` at the bottom); the test
compares what each rank saved with the same steps run here in one process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.core.config import ConfigError, TrainSpec, load_config
from pipeline.core.hashing import sections_hash
from pipeline.core.rundir import CHECKPOINT, TRAIN_HISTORY, RunDir, read_json
from pipeline.core.runner import run_stage
from pipeline.stages.train import train_stage
from pipeline.training.batches import iterate_batches, load_feature_tensors, load_pairs
from pipeline.training.distributed import Dist, init_from_env, resolve_device, shutdown
from pipeline.training.encoding import encode_items, encode_users, tower_config
from pipeline.training.engines import run_on_ray
from pipeline.training.loop import _mine, initial_model, make_phase, new_state, train_step

pytestmark = pytest.mark.distributed

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
# fp32 matmuls in full precision: "medium" (the default) runs them in bf16 on CPUs with AMX,
# whose rounding differs between a (32, D) and a (16, D) matmul far beyond 1e-5
BASE = [
    "tracking.enabled=false",
    "train.batch_size=32",
    "train.progress=false",
    "train.device=cpu",
    "train.matmul_precision=highest",
]
# what a step exercises: learnable temperature, shared sampled negatives, streaming logQ on
# dense tables; row-sparse tables with mined hard negatives and the cross-batch memory
SCENARIOS = {
    "dense": [
        "train.sparse_embeddings=false",
        "loss.learnable_temperature=true",
        "negatives.mixed=8",
        "loss.logq_source=streaming",
    ],
    "sparse": [
        "train.sparse_embeddings=true",
        "negatives.hard=4",
        "negatives.hard_start_epoch=0",
        "negatives.hard_rank_lo=2",
        "negatives.hard_rank_hi=30",
        "negatives.memory=16",
        "negatives.memory_start_epoch=0",
    ],
}
STEPS = 3  # optimiser steps before the models are compared


def _spec(*overrides: str) -> TrainSpec:
    return TrainSpec.of(load_config(TINY, [*BASE, *overrides]))


def _grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    if p.grad is None:
        return None
    return (p.grad.to_dense() if p.grad.is_sparse else p.grad).detach().clone()


def _steps(run: RunDir, overrides: list[str], dist: Dist, steps: int = STEPS) -> dict:
    """The first step's loss and gradients and the parameters after ``steps`` steps of the
    select phase's first batches, on ``dist`` (one process when ``Dist()``)."""
    spec = _spec(*overrides)
    ft = load_feature_tensors(run)
    tcfg = tower_config(spec.model, ft.meta)
    if not tcfg.item_audience:
        ft = ft.without_audience()
    ft = ft.on(dist.device)
    tu, ti = load_pairs(run, ["train"])
    phase = make_phase("select", spec.train, (tu, ti), "train", ft.pop_train, 1, None)
    st = new_state(spec, tcfg, phase, None, dist)
    if st.negatives.wants_mining(0):
        _mine(st, ft, phase, seed=0)
    named = [
        *st.model.named_parameters(),
        *(("loss." + n, p) for n, p in st.loss_fn.named_parameters()),
    ]
    batches = iterate_batches(len(tu), spec.train.batch_size, st.gen)
    out: dict = {}
    for step in range(steps):
        use_hard = spec.negatives.hard > 0
        loss = train_step(
            spec, ft, phase, st, next(batches), use_hard, st.negatives.wants_memory(0)
        )
        if step == 0:
            out["loss"] = loss.item()
            out["grads"] = {n: _grad(p) for n, p in named}
            out["sparse"] = {n for n, p in named if p.grad is not None and p.grad.is_sparse}
        st.opt.step()
    out["params"] = {n: p.detach().cpu().clone() for n, p in named}
    return out


@pytest.fixture(scope="module")
def features_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    cfg = load_config(TINY, ["tracking.enabled=false"])
    run = RunDir(tmp_path_factory.mktemp("dist") / "run")
    run_stage("ingest", cfg, run)
    run_stage("features", cfg, run)
    return run


def _torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, __file__, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def ranks(features_run: RunDir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each scenario run by 2 torchrun processes; rank r's results in <name>_<r>.pt."""
    out = tmp_path_factory.mktemp("ranks")
    _torchrun("--run-dir", str(features_run.root), "--out", str(out))
    return out


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A Ray cluster on this machine (2 CPUs: one per worker), nothing external."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_ranks(
    features_run: RunDir, local_ray: None, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Each scenario run by 2 Ray Train workers (TorchTrainer); like ``ranks``."""
    from ray import cloudpickle

    out = tmp_path_factory.mktemp("ray_ranks")
    # the workers cannot import this test file: its functions travel by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = {"run": str(features_run.root), "out": str(out)}
    run_on_ray(_ray_worker, config, 2, "cpu", tmp_path_factory.mktemp("ray_storage"))
    return out


def _ranks(request: pytest.FixtureRequest, engine: str, name: str) -> list[dict]:
    where = request.getfixturevalue("ranks" if engine == "torchrun" else "ray_ranks")
    return [torch.load(where / f"{name}_{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("engine", ["torchrun", "ray"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_two_processes_step_equals_one_process_with_the_whole_batch(
    features_run: RunDir, request: pytest.FixtureRequest, engine: str, name: str
) -> None:
    one = _steps(features_run, SCENARIOS[name], Dist())
    two = _ranks(request, engine, name)
    # each rank's loss is the mean over its 16 rows: their mean is the 32-row loss
    assert abs((two[0]["loss"] + two[1]["loss"]) / 2 - one["loss"]) < 1e-5
    assert two[0]["loss"] != two[1]["loss"]  # the ranks really scored different rows
    if name == "sparse":
        assert {"user_tower.id_emb.weight", "item_tower.id_emb.weight"} <= one["sparse"]
        assert two[0]["sparse"] == one["sparse"]
    else:
        assert "loss.log_temperature" in one["grads"] and not one["sparse"]
    for n, ref in one["grads"].items():
        for r in (0, 1):
            got = two[r]["grads"][n]
            assert (got is None) == (ref is None), (n, r)
            if ref is not None:
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{n} rank {r}")
    assert any(g is not None and g.abs().max() > 1e-3 for g in one["grads"].values())


@pytest.mark.parametrize("engine", ["torchrun", "ray"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_two_processes_stay_equal_to_one_after_steps(
    features_run: RunDir, request: pytest.FixtureRequest, engine: str, name: str
) -> None:
    one = _steps(features_run, SCENARIOS[name], Dist())
    two = _ranks(request, engine, name)
    start = _steps(features_run, SCENARIOS[name], Dist(), steps=0)["params"]
    moved = 0
    for n, ref in one["params"].items():
        # every rank applied the same update: identical models, not merely close ones
        assert torch.equal(two[0]["params"][n], two[1]["params"][n]), n
        torch.testing.assert_close(two[0]["params"][n], ref, atol=1e-4, rtol=0, msg=n)
        moved += int(not torch.equal(ref, start[n]))
    assert moved >= len(one["params"]) - 1  # the steps changed (nearly) every parameter


def test_ray_engine_train_stage_equals_one_process(
    features_run: RunDir, local_ray: None, tmp_path: Path
) -> None:
    short = ["train.steps_per_epoch=3", "train.epochs=2", "train.batch_size=64"]
    one, two = RunDir(tmp_path / "one"), RunDir(tmp_path / "ray")
    for r in (one, two):
        shutil.copytree(features_run.root, r.root)
    logged: dict[str, list[int]] = {"one": [], "ray": []}
    ref = train_stage(_spec(*short), one, on_epoch=lambda s, m: logged["one"].append(s))
    spec = _spec(*short, "train.engine=ray", "train.processes=2")
    rec = train_stage(spec, two, on_epoch=lambda s, m: logged["ray"].append(s))
    assert rec.metrics["processes"] == 2.0 and "processes" not in ref.metrics
    assert rec.metrics["best_epoch"] == ref.metrics["best_epoch"]
    assert logged["ray"] == logged["one"] and logged["one"][:2] == [0, 1]  # rank 0's epochs
    hist, ref_hist = (read_json(r.path(TRAIN_HISTORY)) for r in (two, one))
    for phase in ref_hist["phases"]:
        for h, want in zip(hist["phases"][phase], ref_hist["phases"][phase], strict=True):
            assert abs(h["loss"] - want["loss"]) < 1e-5
    got = torch.load(two.path(CHECKPOINT), weights_only=False)["model"]
    for k, v in torch.load(one.path(CHECKPOINT), weights_only=False)["model"].items():
        torch.testing.assert_close(got[k], v, atol=1e-4, rtol=0, msg=k)
    assert not list(two.path("train").glob(".engine-record-*"))  # the hand-over file is gone


def test_two_process_train_stage_resumes_from_its_checkpoint(
    features_run: RunDir, tmp_path: Path
) -> None:
    short = ["train.steps_per_epoch=3", "train.patience=5", "train.batch_size=64"]
    three_epochs = _spec(*short, "train.epochs=3")
    one = RunDir(tmp_path / "one")
    shutil.copytree(features_run.root, one.root)
    train_stage(three_epochs, one)  # the reference: one process, no interruption
    run = RunDir(tmp_path / "two")
    shutil.copytree(features_run.root, run.root)
    rec = train_stage(_spec(*short, "train.epochs=2", "train.processes=2"), run)
    assert rec.metrics["processes"] == 2.0 and rec.metrics["epochs_run"] == 2.0
    ckpt = torch.load(run.path(CHECKPOINT), weights_only=False)
    assert ckpt["epoch"] == 1 and len(ckpt["torch_rng_ranks"]) == 2
    ckpt["spec_hash"] = sections_hash(three_epochs, TrainSpec.sections())  # go on to epoch 3
    torch.save(ckpt, run.path(CHECKPOINT))
    logged: list[int] = []
    resumed_spec = _spec(*short, "train.epochs=3", "train.processes=2", "train.engine=torchrun")
    train_stage(resumed_spec, run, resume=True, on_epoch=lambda s, m: logged.append(s))
    assert logged == [2]  # only the third epoch ran: the first two came from the checkpoint
    hist, ref_hist = (read_json(r.path(TRAIN_HISTORY))["history"] for r in (run, one))
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    for h, ref in zip(hist, ref_hist, strict=True):
        assert abs(h["loss"] - ref["loss"]) < 1e-5
    resumed = torch.load(run.path(CHECKPOINT), weights_only=False)["model"]
    straight = torch.load(one.path(CHECKPOINT), weights_only=False)["model"]
    for k, v in straight.items():
        torch.testing.assert_close(resumed[k], v, atol=1e-4, rtol=0, msg=k)


def test_a_failing_rank_fails_the_stage_with_one_line(tmp_path: Path) -> None:
    spec = _spec("train.processes=2")  # no features in this run directory: every rank fails
    with pytest.raises(ChildProcessError, match=r"torchrun with 2 processes .*\(exit code 1\)"):
        train_stage(spec, RunDir(tmp_path / "empty"))


def test_batch_that_does_not_split_over_the_processes_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size \(33\).*train\.processes \(2\)"):
        _spec("train.batch_size=33", "train.processes=2")


def test_bf16_autocast_loss_is_within_bf16_rounding_of_fp32(features_run: RunDir) -> None:
    fp32 = _steps(features_run, [], Dist(), steps=1)
    bf16 = _steps(features_run, ["train.precision=bf16"], Dist(), steps=1)
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per op); the loss (about
    # log 32 = 3.5) sums 32 x 32 logits: 1% of it is a generous bound, and autocast really
    # ran if the two are not bit-equal
    assert abs(bf16["loss"] - fp32["loss"]) <= 0.01 * fp32["loss"]
    assert bf16["loss"] != fp32["loss"]
    assert all(g is None or bool(torch.isfinite(g).all()) for g in bf16["grads"].values())


def test_auto_device_is_the_cpu_without_cuda_and_cuda_is_refused() -> None:
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="train.device is 'cuda'"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_cuda_step_equals_cpu_step(features_run: RunDir, name: str) -> None:
    cpu = _steps(features_run, SCENARIOS[name], Dist(), steps=2)
    cuda = _steps(
        features_run,
        [*SCENARIOS[name], "train.device=cuda", "train.matmul_precision=highest"],
        Dist(device=torch.device("cuda")),
        steps=2,
    )
    assert abs(cuda["loss"] - cpu["loss"]) < 1e-4
    for n, ref in cpu["params"].items():
        torch.testing.assert_close(cuda["params"][n], ref, atol=1e-3, rtol=0, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_train_stage_runs_and_learns(features_run: RunDir, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    shutil.copytree(features_run.root, run.root)
    spec = _spec(
        "train.device=cuda", "train.precision=bf16", "train.epochs=3", "train.batch_size=64"
    )
    train_stage(spec, run)
    hist = read_json(run.path(TRAIN_HISTORY))["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    state = torch.load(run.path(CHECKPOINT), weights_only=False)["model"]
    assert all(v.device.type == "cpu" for v in state.values())  # checkpoints load anywhere


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_encoding_equals_cpu_encoding(features_run: RunDir) -> None:
    spec = _spec()
    ft = load_feature_tensors(features_run)
    tcfg = tower_config(spec.model, ft.meta)
    ft = ft if tcfg.item_audience else ft.without_audience()
    model = initial_model(spec, tcfg, None)[0]
    users = torch.arange(1, ft.n_users)
    cpu = (encode_items(model, ft, "train"), encode_users(model, ft, users, "train"))
    model.to("cuda")
    on = ft.on(torch.device("cuda"))
    cuda = (encode_items(model, on, "train"), encode_users(model, on, users, "train"))
    for got, want in zip(cuda, cpu, strict=True):
        assert got.device.type == "cpu"  # handed back in host memory
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def _save_steps(run: Path, out: Path) -> Dist:
    """Every scenario's steps on this rank, saved to <out>/<name>_<rank>.pt."""
    dist = init_from_env("cpu")
    for name, overrides in SCENARIOS.items():
        result = _steps(RunDir(run), overrides, dist)
        torch.save(result, out / f"{name}_{dist.rank}.pt")
    return dist


def _ray_worker(config: dict) -> None:
    """A Ray Train worker (Ray joined the process group and leaves it)."""
    _save_steps(Path(config["run"]), Path(config["out"]))


def _worker(argv: list[str]) -> None:
    """One torchrun rank."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    shutdown(_save_steps(args.run_dir, args.out))


if __name__ == "__main__":
    _worker(sys.argv[1:])
