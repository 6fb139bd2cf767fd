"""Train the tiny ResNet on digits with DDP, gradient accumulation and bndoctor SyncBatchNorm.

Needs the demo extra for the digits data: pip install 'bndoctor[demo]' (scikit-learn).

Runs on CPU (gloo) or GPU (nccl), one process per device:

    torchrun --standalone --nproc-per-node=2 examples/ddp_syncbn.py --accum 8 --micro-batch 2

Every micro-batch is normalised over all ranks (micro-batch x world size
samples); the optimizer sees micro-batch x accum x world size samples.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import bndoctor
from bndoctor.bench.data import load_digits
from bndoctor.models import tiny_resnet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = DDP(bndoctor.to_sync_bn(tiny_resnet()).to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = load_digits()
    gen = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        optimizer.zero_grad()
        for micro in range(args.accum):
            idx = torch.randint(0, len(data.y_train), (args.micro_batch,), generator=gen)
            x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
            # no gradient all-reduce until the last micro-batch; SyncBN's statistics are synced every time
            context = model.no_sync() if micro < args.accum - 1 else torch.enable_grad()
            with context:
                (F.cross_entropy(model(x), y) / args.accum).backward()
        optimizer.step()
    divergence = bndoctor.rank_divergence(model.module)
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.x_val.to(device)).argmax(1).cpu() == data.y_val).double().mean().item()
    if rank == 0:
        print(f"world {world}: val accuracy {accuracy:.3f}, running-statistics divergence {divergence.max:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
