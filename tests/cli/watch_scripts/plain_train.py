"""A training script that knows nothing of bndoctor: gradient accumulation, BatchNorm, a chosen exit code.

python plain_train.py [EXIT_CODE]
"""

import sys

import torch
import torch.nn as nn

torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1),
    nn.BatchNorm2d(8),
    nn.ReLU(),
    nn.Conv2d(8, 8, 3, padding=1),
    nn.BatchNorm2d(8),
    nn.ReLU(),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(8, 10),
)
criterion = nn.CrossEntropyLoss()  # a module without BN, called outside the model: not monitored
optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
x, y = torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,))
accum = 4
for _step in range(30):
    for _ in range(accum):
        i = torch.randint(0, 256, (2,))
        (criterion(net(x[i]), y[i]) / accum).backward()
    optimizer.step()
    optimizer.zero_grad()
net.eval()
with torch.no_grad():
    accuracy = (net(x).argmax(1) == y).float().mean().item()  # eval-mode forwards are not counted
print(f"trained; accuracy {accuracy:.2f}")
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
