"""A torchrun DDP training script that knows nothing of bndoctor (gloo, CPU, micro-batch 2, 2 accumulation steps).

torchrun --standalone --nproc-per-node 2 ddp_train.py
"""

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

dist.init_process_group("gloo")
torch.set_num_threads(1)
rank = dist.get_rank()
torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1),
    nn.BatchNorm2d(8),
    nn.ReLU(),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(8, 10),
)
model = DistributedDataParallel(net)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
gen = torch.Generator().manual_seed(rank)  # each rank its own data: the BN statistics drift apart
x, y = torch.randn(128, 1, 8, 8, generator=gen) + rank, torch.randint(0, 10, (128,), generator=gen)
accum = 2
for _step in range(20):
    for k in range(accum):
        i = torch.randint(0, 128, (2,), generator=gen)
        sync = k == accum - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            (F.cross_entropy(model(x[i]), y[i]) / accum).backward()
    optimizer.step()
    optimizer.zero_grad()
if rank == 0:
    print("trained on", dist.get_world_size(), "ranks")
dist.destroy_process_group()
