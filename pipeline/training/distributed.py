"""Data-parallel training under ``torchrun``: the process group, the device, and the few
collectives the training loop needs.

Every process (rank) holds the whole model and the whole feature tables, and draws the same
global, seeded permutation of the training rows each epoch; a step's global batch of B rows is
cut into W slices of b = B / W and rank r encodes slice r. The loss needs every row's positive
as a candidate: :meth:`Dist.gather_with_grad` all-gathers the (b, D) item vectors into the
(B, D) in-batch candidates through ``torch.distributed.nn.functional.all_gather``, whose
backward sends each rank's gradient for every slice back to the slice's owner and sums it there
(a reduce-scatter). Each rank's loss is the mean over its own b rows, so the sum over ranks of
the gradients is W times the 1-process gradient of the mean over B rows, and
:meth:`Dist.average_gradients` divides the all-reduced sum by W: every rank then holds exactly
the gradient one process computes on the whole batch (up to float summation order).

Why not the cheaper gather that keeps only the local slice's gradient and detaches the others
(sentence-transformers' ``all_gather(with_grad=False)``, NeMo's ``dist_gather_tensor``): rank
r's loss then never reaches the items encoded on the other ranks, so the gradient misses every
cross-rank term and is not the 1-process gradient; ``all_gather_with_grad`` (the same
``torch.distributed.nn`` recipe used here, as in open_clip and VICReg) is.

Dense gradients are all-reduced in one flat buffer (what DDP's buckets do); the embedding
tables' row-sparse gradients (``train.sparse_embeddings``) cannot go through DDP or an
all-reduce of a sparse tensor, so their (rows, values) are all-gathered (padded to the longest)
and coalesced: every rank applies the same row-sparse update to the same rows.

With ``WORLD_SIZE`` unset or 1 everything here is the identity: the single-process trainer runs
the same code. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """The training device of ``train.device``: "auto" = CUDA when available, else the CPU;
    under torchrun the GPU of this process's ``LOCAL_RANK``."""
    if setting not in DEVICES:
        raise ValueError(f"train.device must be one of {DEVICES}, got {setting!r}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            "train.device is 'cuda' but torch sees no CUDA device "
            f"(torch {torch.__version__}); use train.device=auto or cpu"
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def check_gpus(device: torch.device, processes: int) -> None:
    """Refuse more processes on this machine than it has GPUs when training on CUDA."""
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise ValueError(
            f"{processes} processes on this machine but {torch.cuda.device_count()} CUDA "
            "device(s): NCCL needs one GPU per process; start fewer processes or set "
            "train.device=cpu"
        )


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``Dist()`` is the single-process job (no collective
    does anything). Build a real one with :func:`init_from_env`."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where this rank's collectives run

    @property
    def active(self) -> bool:
        """More than one process: collectives communicate."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that validates, writes checkpoints and history, logs."""
        return self.rank == 0

    def local_slice(self, batch_size: int) -> slice:
        """The rows of a global batch of ``batch_size`` this rank encodes."""
        if batch_size % self.world:
            raise ValueError(
                f"a batch of {batch_size} rows does not split over {self.world} processes: "
                "train.batch_size must be a multiple of the number of processes (and at most "
                "the number of training events)"
            )
        b = batch_size // self.world
        return slice(self.rank * b, (self.rank + 1) * b)

    # -- collectives (all ranks must call them, in the same order) -------------------------
    def gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """(b, ...) -> (W * b, ...) rank-ordered; the backward returns to each rank the sum
        over ranks of the gradient of its slice (see the module docstring)."""
        if not self.active:
            return x
        from torch.distributed.nn.functional import all_gather

        # sent as float32 (exact for bf16 under autocast; not every gloo build reduces bf16)
        parts = all_gather(x.float().contiguous())  # W x (b, ...)
        return torch.cat(parts, 0).to(x.dtype)  # (W * b, ...)

    def average_gradients(
        self, dense: Sequence[torch.nn.Parameter], sparse: Sequence[torch.nn.Parameter]
    ) -> None:
        """Replace every gradient by its mean over the ranks, in place.

        ``dense`` parameters have strided gradients (all-reduced in one flat buffer);
        ``sparse`` ones row-sparse gradients (all-gathered and coalesced). A parameter with a
        gradient on some rank and none on another gets a zero gradient there, so every rank
        ends with the same set of gradients.
        """
        if not self.active:
            return
        params = [*dense, *sparse]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        has = has.to(self.device)
        tdist.all_reduce(has, op=tdist.ReduceOp.MAX)
        present = has.bool().tolist()
        flat = [p for p, keep in zip(dense, present[: len(dense)], strict=True) if keep]
        for p in flat:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if flat:
            buf = torch.cat([p.grad.reshape(-1) for p in flat])  # (sum of sizes,)
            tdist.all_reduce(buf)
            buf.div_(self.world)
            offset = 0
            for p in flat:
                n = p.grad.numel()
                p.grad.copy_(buf[offset : offset + n].view_as(p.grad))
                offset += n
        for p, keep in zip(sparse, present[len(dense) :], strict=True):
            if keep:
                p.grad = self._mean_sparse(p)

    def _mean_sparse(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The ranks' mean of ``p``'s row-sparse gradient, coalesced (sorted unique rows)."""
        d = p.shape[1]
        if p.grad is None:
            rows, values = p.new_zeros(0, dtype=torch.long), p.new_zeros(0, d)
        else:
            g = p.grad
            rows, values = g._indices()[0], g._values()  # (U,), (U, D)
        sizes = self._all_gather(torch.tensor([rows.numel()], device=self.device))
        counts = [int(s) for s in sizes]
        longest = max(counts)
        pad = longest - rows.numel()
        rows_p = torch.cat([rows, rows.new_zeros(pad)])  # (longest,)
        values_p = torch.cat([values, values.new_zeros(pad, d)])  # (longest, D)
        all_rows = self._all_gather(rows_p.to(self.device))  # W x (longest,)
        all_values = self._all_gather(values_p.to(self.device))  # W x (longest, D)
        rows_cat = torch.cat([r[:n] for r, n in zip(all_rows, counts, strict=True)])  # (sum,)
        values_cat = torch.cat([v[:n] for v, n in zip(all_values, counts, strict=True)])
        grad = torch.sparse_coo_tensor(
            rows_cat.to(p.device).unsqueeze(0),
            values_cat.to(p.device) / self.world,
            p.shape,
        )
        return grad.coalesce()  # rows on several ranks: their values summed once

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        tdist.all_gather(out, t.contiguous())
        return out

    def mean(self, value: float) -> float:
        """The mean of a float over the ranks (float64)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return float(t.item()) / self.world

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled: small objects, e.g. an epoch's row)."""
        if not self.active:
            return obj
        box = [obj if self.main else None]
        tdist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, rank-ordered (pickled: small objects)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (as DDP does at construction): the
        ranks start identical even if something drew a different random number."""
        if not self.active:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                tdist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.active:
            tdist.barrier()


def init_from_env(device_setting: str) -> Dist:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) and pick this rank's device: gloo on CPU, NCCL on CUDA.
    Without torchrun (``WORLD_SIZE`` unset or 1): the single-process ``Dist`` on the device."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting, local)
    if tdist.is_initialized():  # joined already (Ray Train's workers, a second call)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return Dist(tdist.get_rank(), tdist.get_world_size(), local, device)
    if not launched_by_torchrun():
        return Dist(device=device)
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ValueError(f"WORLD_SIZE is set but {key} is not: start the job with torchrun")
    if device.type == "cuda":
        check_gpus(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), local, device)


def shutdown(dist: Dist) -> None:
    """Leave the process group (after a last barrier) if this process joined one."""
    if dist.active and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def torchrun(processes: int, module: str, args: list[str]) -> None:
    """Run ``python -m module args`` in ``processes`` processes on this machine under torchrun
    (``python -m torch.distributed.run --standalone``, a free port); their output goes to
    ours. Raises ChildProcessError (one line) when a process fails."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        module,
        *args,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, without its warning
    done = subprocess.run(cmd, env=env, check=False)
    if done.returncode != 0:
        raise ChildProcessError(
            f"torchrun with {processes} processes of {module} failed (exit code "
            f"{done.returncode}); the failing rank's traceback is printed above"
        )
