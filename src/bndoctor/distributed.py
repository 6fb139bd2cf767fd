"""The only module that talks to torch.distributed.

Every collective here is called by all ranks of the group the same number of
times, whatever data each rank holds (including none), so callers cannot
deadlock by skipping a call on a rank with an empty share.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .moments import pool_columns

__all__ = [
    "GroupRef",
    "HasProcessGroup",
    "active",
    "all_gather_stack",
    "all_ok",
    "all_reduce_sum",
    "gather_rows",
    "pool_over_ranks",
    "rank",
    "require_agreement",
    "subgroup",
    "world_size",
]


class GroupRef:
    """Holds a process group for a module: shared (not copied) by deepcopy, dropped by pickle."""

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict[int, Any]) -> GroupRef:
        return self

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return (GroupRef, ())  # a group cannot cross processes; the default group is used after loading


class HasProcessGroup:
    """Mixin for layers that keep a process group (``self._group``, a :class:`GroupRef`)."""

    _group: GroupRef

    @property
    def process_group(self) -> Any:
        """The ranks the layer works across (None: all ranks)."""
        return self._group.group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        self._group = GroupRef(group)
        self.__dict__["_layout_agreed"] = False  # another group: check again

    def require_same_layout(self, x: torch.Tensor, num_features: int) -> None:
        """Before a layer's first collective: every rank of its group has this layer, with the same channels.

        Once agreed, a flag on the layer skips the check (no cost per step). A rank whose model differs
        would otherwise abort gloo's gather (sizes differ) on that rank only; here every rank raises.
        """
        if self.__dict__.get("_layout_agreed"):
            return
        require_agreement(
            [num_features, x.dim()],
            self.process_group,
            what=f"{type(self).__name__} pools statistics across ranks and needs the same layer on each",
            describe=lambda row: f"{int(row[0])} channels, {int(row[1])}-D input",
            hint="build the same model on every rank (the same layers, channels and input rank)",
        )
        self.__dict__["_layout_agreed"] = True


def active(group: Any = None) -> bool:
    """True when torch.distributed is initialised and the group has more than one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


def world_size(group: Any = None) -> int:
    """Processes in ``group`` (default the world); 1 when torch.distributed is not initialised."""
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (default the world); 0 when torch.distributed is not initialised."""
    import torch.distributed as dist

    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _collective_device(group: Any, like: torch.device) -> torch.device:
    import torch.distributed as dist

    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else like


def all_ok(ok: bool, group: Any = None) -> list[bool]:
    """Every rank's ``ok`` flag (one all_gather); lets ranks agree to stop together after a failure."""
    flag = torch.tensor([1.0 if ok else 0.0], device=_collective_device(group, torch.device("cpu")))
    return [bool(v) for v in gather_rows(flag, group).view(-1).tolist()]


def require_agreement(
    values: Sequence[float], group: Any, *, what: str, describe: Callable[[list[float]], str], hint: str
) -> None:
    """Raise the same :class:`~bndoctor.errors.BNDoctorError` on every rank unless all ranks pass equal ``values``.

    One ``all_gather`` of the values (float64: integers up to 2^53 compare exactly). Callers check what must be
    equal before a collective whose sizes depend on it, which would otherwise abort (gloo) or hang.

    Args:
        values: this rank's numbers (the same count on every rank).
        group: the process group.
        what: the requirement, e.g. ``"SyncBatchNorm 'bn1' needs the same channels on every rank"``.
        describe: one rank's values in words, for the message.
        hint: how to fix it.
    """
    from .errors import BNDoctorError

    rows = all_gather_stack(torch.tensor([float(v) for v in values], dtype=torch.float64), group).tolist()
    differ = [r for r, row in enumerate(rows) if row != rows[0]]
    if differ:
        details = "; ".join(f"rank {r}: {describe(row)}" for r, row in enumerate(rows))
        raise BNDoctorError(f"{what}, but rank(s) {differ} differ from rank 0 ({details})", hint=hint)


def all_gather_stack(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Gather an equally shaped tensor from every rank: returns ``(world_size, *tensor.shape)``."""
    rows = gather_rows(tensor.reshape(-1), group)
    return rows.view(rows.shape[0], *tensor.shape)


def gather_rows(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every rank's 1-D ``tensor`` (same length on all ranks) as the rows of a ``(world_size, D)`` tensor.

    One ``all_gather`` into a single flat tensor: on gloo it takes about half the time of an
    ``all_reduce`` of the same small tensor (BENCHMARKS.md, SyncBatchNorm), so layers that pool a
    few numbers per channel gather them and add them up locally.
    """
    import torch.distributed as dist

    device = _collective_device(group, tensor.device)
    local = tensor.to(device).contiguous()
    world = dist.get_world_size(group)
    if not _FLAT_GATHER_UNSUPPORTED:
        out = torch.empty(world * local.numel(), dtype=local.dtype, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name first
        try:
            gather(out, local.view(-1), group=group)
            return out.view(world, local.numel()).to(tensor.device)
        except RuntimeError as exc:  # raised on every rank before any traffic, so all ranks fall back alike
            if not _UNSUPPORTED.search(str(exc)):
                raise
            _FLAT_GATHER_UNSUPPORTED.append(True)
    rows = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(rows, local, group=group)
    return torch.stack(rows).view(world, local.numel()).to(tensor.device)


#: set once a backend has said it cannot gather into one flat tensor (older gloo builds); then lists are used
_FLAT_GATHER_UNSUPPORTED: list[bool] = []
# how backends say so: gloo before torch 2.6 "no support for _allgather_base in Gloo process group"; others
# "... does not support ..." or "unsupported device type"
_UNSUPPORTED = re.compile(r"no support|not support|unsupported", re.IGNORECASE)


def pool_over_ranks(
    mean: torch.Tensor, var: torch.Tensor, n: int, group: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool per-channel statistics of ``n`` local samples across the ranks of ``group``.

    One ``all_gather`` of every rank's ``[mean, var, n]``, then :func:`bndoctor.moments.pool_columns` on every
    rank, in the dtype of ``mean``.

    Args:
        mean, var: this rank's per-channel mean and biased variance (ignored when ``n`` is 0).
        n: this rank's sample count per channel (0 for an empty local batch).
        group: the process group (None: the world).

    Returns:
        The global count (a 0-d tensor: no host read), mean and biased variance; with every rank empty the
        count is 0 and the statistics are 0.
    """
    channels = mean.numel()
    if n == 0:  # an empty local batch contributes nothing (its moments may be NaN)
        mean = var = torch.zeros_like(mean)
    rows = gather_rows(torch.cat([mean, var, mean.new_full((1,), float(n))]), group)  # (world, 2C + 1)
    total, pooled, m2 = pool_columns(rows[:, -1], rows[:, :channels], rows[:, channels:-1], dtype=None)
    count = total[0]
    return count, pooled, m2 / count.clamp(min=1.0)


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks of ``group`` (a new tensor, not differentiable)."""
    import torch.distributed as dist

    device = _collective_device(group, tensor.device)
    total = tensor.detach().to(device, copy=True).contiguous()
    dist.all_reduce(total, group=group)
    return total.to(tensor.device)


def subgroup(group_size: int, group: Any = None) -> Any:
    """This rank's group among consecutive blocks of ``group_size`` ranks (e.g. one per node).

    Every rank must call this (``new_group`` is collective), with the same ``group_size``.
    """
    import torch.distributed as dist

    from .errors import BNDoctorError

    world = world_size(group)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or world % group_size:
        raise BNDoctorError(
            f"expected group_size to divide the world size {world} (got {group_size!r})",
            hint=f"pass a divisor of {world}, e.g. the number of GPUs per node",
        )
    if not (dist.is_available() and dist.is_initialized()):
        return None
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    mine = None
    for start in range(0, world, group_size):
        members = ranks[start : start + group_size]
        created = dist.new_group(members)
        if dist.get_rank() in members:
            mine = created
    return mine
