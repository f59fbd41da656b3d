"""Data-parallel calibration helpers: the few collectives the modifiers need.

llm-compressor 0.14 runs ``oneshot`` data-parallel when the script is started
with ``torchrun`` and calls ``compressed_tensors.offload.init_dist()``: every
rank calibrates on its own share of the samples, and the modifiers combine
their statistics (GPTQ reduces its Hessians, then spreads the compression over
ranks and broadcasts the results). These helpers do the same for our
statistics. Without a process group every function is the identity, so a
single-process run takes exactly the code path it always did.

Equality with a single-process run rests on two rules:

- statistics are per-sample values summed in float64 (sums of float32 values,
  exact to about 1e-16 relative whatever the order), and combined across ranks
  by a reduction to rank 0 followed by a broadcast, so that every rank holds
  bitwise the same totals;
- anything derived from the totals (ratios, masks) is computed once, on one
  rank, and broadcast.

Example::

    >>> totals = sum_across_ranks([layer_sums, layer_counts])   # identity in one process
    >>> owner = assign_to_ranks(["a", "b", "c"], [3, 2, 1])     # {"a": 0, "b": 1, "c": 1} with 2 ranks
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from compressed_tensors.distributed import greedy_bin_packing
from compressed_tensors.distributed import is_distributed as _ct_is_distributed
from compressed_tensors.utils import align_module_device

__all__ = [
    "any_rank",
    "assign_to_ranks",
    "broadcast_object",
    "broadcast_tensor",
    "barrier",
    "comm_device",
    "gather_objects",
    "init_distributed",
    "is_distributed",
    "rank",
    "rank_share",
    "reduce_to_rank",
    "results_from_owners",
    "share_bounds",
    "shares_offload",
    "sum_across_ranks",
    "union_across_ranks",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank.

    Follows compressed-tensors (which turns distribution off inside its
    single-threaded sections), so our collectives run exactly where theirs do.
    """
    return _ct_is_distributed() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def init_distributed() -> None:
    """Join the process group ``torchrun`` set up: ``init_dist`` on GPUs, gloo on CPU.

    ``compressed_tensors.offload.init_dist`` needs an accelerator; this falls
    back to the gloo backend so the same script also runs on CPU (as the tests
    do). Does nothing if a group already exists.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "no distributed environment: start the script with `torchrun --nproc_per_node N script.py`"
        )
    if torch.accelerator.is_available():
        from compressed_tensors.offload import init_dist

        init_dist()
    else:
        dist.init_process_group(backend="gloo")


def comm_device() -> torch.device:
    """Where collective tensors must live: CPU for gloo, this rank's accelerator otherwise."""
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def sum_across_ranks(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sums over all ranks, bitwise identical on every rank.

    The tensors (any shapes; every rank passes the same shapes in the same order)
    travel as one float64 buffer, so one call costs two collectives. Integer
    counts below 2**53 are exact in float64 and come back in their own dtype.
    The buffer is reduced to rank 0 and then broadcast: an all-reduce may give
    ranks results that differ in the last bit, and ratios or masks derived from
    the totals must not.

    :return: new tensors, on the devices and in the dtypes of the inputs
    """
    if not is_distributed() or not tensors:  # every rank passes the same list: all skip alike
        return [t.clone() for t in tensors]
    device = comm_device()
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
    dist.reduce(flat, dst=0, op=dist.ReduceOp.SUM)
    dist.broadcast(flat, src=0)
    out, start = [], 0
    for t in tensors:
        part = flat[start : start + t.numel()].reshape(t.shape)
        out.append(part.to(device=t.device, dtype=t.dtype))
        start += t.numel()
    return out


def reduce_to_rank(tensor: torch.Tensor, dst: int) -> torch.Tensor | None:
    """The element-wise sum of every rank's ``tensor`` on rank ``dst`` (None elsewhere).

    For large statistics only one rank needs (a Hessian its owner prunes with): no
    rank holds more than its own copy and the sum, unlike ``sum_across_ranks``.
    Returned on ``tensor``'s device and in its dtype.
    """
    if not is_distributed():
        return tensor
    buffer = tensor.detach().to(device=comm_device()).contiguous()
    dist.reduce(buffer, dst=dst, op=dist.ReduceOp.SUM)
    return buffer.to(device=tensor.device) if rank() == dst else None


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank.

    Use it before raising: a rank that raises alone leaves the others waiting
    in their next collective forever.
    """
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def union_across_ranks(names: Sequence[str]) -> list[str]:
    """Sorted union of every rank's ``names``: one agreed order for collectives."""
    return sorted(set().union(*gather_objects(sorted(set(names)))))


def broadcast_object(obj, src: int = 0):
    """``src``'s picklable ``obj`` on every rank (``obj`` itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensor(tensor: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype, src: int,
                     device: torch.device | None = None) -> torch.Tensor:
    """``src``'s tensor on every rank; other ranks pass None and the shape and dtype.

    Booleans travel as uint8 (not every backend broadcasts bool).
    """
    if not is_distributed():
        return tensor
    wire = torch.uint8 if dtype == torch.bool else dtype
    if rank() == src:
        buffer = tensor.detach().to(device=comm_device(), dtype=wire).contiguous()
    else:
        buffer = torch.empty(tuple(shape), dtype=wire, device=comm_device())
    dist.broadcast(buffer, src=src)
    return buffer.to(device=device or buffer.device, dtype=dtype)


def assign_to_ranks(items: Sequence, weights: Sequence[float]) -> dict:
    """Owner rank of each item, balancing total weight (llm-compressor's GPTQ rule).

    Greedy bin packing, heaviest first; ties keep the given order, so every rank
    computes the same assignment from the same list. All rank 0 in one process.
    """
    if not is_distributed():
        return {item: 0 for item in items}
    weight_of = dict(zip(items, weights))
    _, _, owner = greedy_bin_packing(list(items), dist.get_world_size(), lambda item: weight_of[item])
    return owner


def results_from_owners(modules: Sequence[torch.nn.Module], owner: dict,
                        compute: Callable[[torch.nn.Module], torch.Tensor],
                        result_dtype: Callable[[torch.nn.Module], torch.dtype],
                        ) -> Iterator[tuple[torch.nn.Module, torch.Tensor]]:
    """``(module, compute(module))`` for each module in turn, on every rank; computed once, by its owner.

    ``compute`` gives a tensor shaped like the module's weight (a mask, a new
    weight), of dtype ``result_dtype(module)``; ``owner`` is ``assign_to_ranks``'s.
    Under torchrun every rank first computes the modules it owns (the ranks work
    at once), then each result is broadcast from its owner, in the order of
    ``modules``: every rank must iterate to the end, in step. In one process a
    result is computed just before it is yielded, so one is in memory at a time.

    Each pair is yielded inside ``torch.no_grad()`` and ``align_module_device``:
    the weight is onloaded while the caller writes it.

    Example::

        >>> for module, mask in results_from_owners(modules, owner, wanda_mask, lambda m: torch.bool):
        ...     module.weight.data.masked_fill_(mask, 0)
    """
    owned = {m: compute(m) for m in modules if owner[m] == rank()} if is_distributed() else {}
    for module in modules:
        with torch.no_grad(), align_module_device(module):
            result = owned.pop(module) if module in owned else None
            if result is None and owner[module] == rank():
                result = compute(module)
            yield module, broadcast_tensor(result, module.weight.shape, result_dtype(module),
                                           src=owner[module], device=module.weight.device)


def share_bounds(num_samples: int, rank_: int, world: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank_``'s contiguous share of ``num_samples``.

    Shares differ in size by at most one and cover every sample exactly once.

    >>> [share_bounds(5, r, 2) for r in range(2)]
    [(0, 2), (2, 5)]
    """
    if not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} is outside 0..{world - 1}")
    return num_samples * rank_ // world, num_samples * (rank_ + 1) // world


def rank_share(dataset):
    """This rank's share of a calibration ``datasets.Dataset`` (all of it in one process).

    Pass it to ``oneshot`` under ``torchrun``. llm-compressor 0.14.0.1 means to
    split a dataset that every rank passes whole, but hands every rank the first
    rank's share (its sampler indexes the whole dataset with positions within the
    share): the other samples are never seen. A dataset each rank selected for
    itself is used as given.

    Example::

        >>> ds = rank_share(load_calibration_dataset("calib/"))   # rank 1 of 2: rows 64..127 of 128
    """
    if not is_distributed():
        return dataset
    start, end = share_bounds(len(dataset), rank(), world_size())
    if start == end:
        raise ValueError(
            f"{len(dataset)} calibration samples cannot give each of {world_size()} ranks one; "
            "use more samples or fewer processes"
        )
    return dataset.select(range(start, end))


def shares_offload(module: torch.nn.Module) -> bool:
    """True if the module's offloaded parameters are one storage for all ranks.

    compressed-tensors shares CPU (and disk) offload between ranks: rank 0's
    weights in shared memory, every rank pointing at them. Then exactly one rank
    may write a new value, and the others only refresh their own onloaded
    copies (on a GPU). Device offload is a private copy per rank.
    """
    from compressed_tensors.offload.cache import DistributedCPUCache, DistributedDiskCache

    return isinstance(module._parameters, (DistributedCPUCache, DistributedDiskCache))
