"""Run a function on several gloo ranks (real processes) and collect what each returns."""

from __future__ import annotations

import datetime
import gc
import os
import pickle
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args, timeout=60):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
    except BaseException as exc:  # report the failure to the parent
        result = exc
    # the result is written before tear-down: a crash while gloo/DDP threads shut down must not lose it
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    gc.collect()
    dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: int = 60):
    """``fn(rank, world_size, *args)`` on each rank; returns the list of results (exceptions included).

    ``timeout`` (seconds) bounds every collective: a hang fails the test instead of blocking CI.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            spawn_args = (world_size, _free_port(), out_dir, fn, args, timeout)
            mp.spawn(_entry, args=spawn_args, nprocs=world_size, join=True)
        except mp.ProcessExitedException:
            # a rank that wrote its result and then died in process tear-down (seen with DDP + gloo:
            # "terminate called without an active exception") still counts; a missing result does not
            if not all(os.path.exists(os.path.join(out_dir, f"{r}.pkl")) for r in range(world_size)):
                raise
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast", "barrier")


class count_collectives:
    """Count calls of torch.distributed's collectives made inside the ``with`` block (``.calls``)."""

    def __enter__(self):
        import torch.distributed as dist

        self.calls = 0
        self._originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

        def counting(original):
            def call(*args, **kwargs):
                self.calls += 1
                return original(*args, **kwargs)

            return call

        for name, original in self._originals.items():
            setattr(dist, name, counting(original))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, original in self._originals.items():
            setattr(dist, name, original)
        return False
