"""Where a BNMonitor sample's time goes (torch.profiler), on the device given: one sampled training step
of the ResNet-18-sized net at batch 8 x 3x64x64 against unsampled ones.

    python benchmarks/profile_monitor.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
import torch.nn.functional as F

from _device import clock
from bndoctor.models import resnet18
from bndoctor.monitor import BNMonitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet18(num_classes=10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 3, 64, 64, device=device), torch.randint(0, 10, (8,), device=device)

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    monitor = BNMonitor(model, every=2, sink=tempfile.mktemp(suffix=".jsonl"), warmup=0)
    for _ in range(6):
        step()
    times = {True: [], False: []}
    for k in range(40):
        start = clock(device)
        step()
        times[k % 2 == 0].append(clock(device) - start)
    sampled, plain = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"sampled step {sampled * 1e3:.2f} ms, unsampled {plain * 1e3:.2f} ms: a sample costs "
        f"{(sampled - plain) * 1e3:.2f} ms"
    )
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()  # sampled (k = 40 is even)
        clock(device)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=50))
    monitor.close()


if __name__ == "__main__":
    main()
