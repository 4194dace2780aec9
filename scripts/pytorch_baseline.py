"""Plain PyTorch on the samples a meshtrain testnet trains on: the baseline
of scripts/bench-vs-pytorch.sh (issue 18).

The same networks as model/src/net.rs (MLP 784-256-128-10, CNN
conv32-bn-pool-conv64-bn-pool-fc128-fc10), Adam (lr 1e-3, PyTorch's betas),
batch 64, pixels scaled to [0, 1], Fashion-MNIST's 60,000 training images
for EPOCHS epochs, then accuracy on its 10,000 test images. The wall counts
everything after the interpreter starts: reading the files, training and the
evaluation, as the node's wall does.

Prints one JSON line: {"model", "epochs", "threads", "wall_s", "train_s",
"accuracy", "samples"}.
"""

import argparse
import gzip
import json
import os
import struct
import sys
import time

T0 = time.perf_counter()

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from torch import nn  # noqa: E402


def read_idx(path):
    """One IDX file (plain or gzipped) as a uint8 tensor of its shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        sys.exit(f"{path}: not an unsigned-byte IDX file")
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    body = data[4 + 4 * dims :]
    count = 1
    for d in shape:
        count *= d
    if len(body) != count:
        sys.exit(f"{path}: {len(body)} bytes of data where the header says {count}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def find(directory, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    sys.exit(f"{directory}: no {stem} (or {stem}.gz)")


def accuracy(net, test_x, test_y):
    """The share of test images `net` classifies right, in chunks of 1000
    (as meshtrain evaluates)."""
    net.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, test_x.shape[0], 1000):
            x = test_x[i : i + 1000].unsqueeze(1).float().div_(255.0)
            right += (net(x).argmax(1) == test_y[i : i + 1000]).sum().item()
    return right / test_x.shape[0]


def network(model):
    if model == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    if model == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    sys.exit(f"unknown model {model!r} (mlp or cnn)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    xs = read_idx(find(a.data, "train-images-idx3-ubyte"))
    ys = read_idx(find(a.data, "train-labels-idx1-ubyte")).long()
    test_x = read_idx(find(a.data, "t10k-images-idx3-ubyte"))
    test_y = read_idx(find(a.data, "t10k-labels-idx1-ubyte")).long()
    if xs.shape[0] != ys.shape[0] or test_x.shape[0] != test_y.shape[0]:
        sys.exit(f"{a.data}: image and label counts differ")

    net = network(a.model)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    loss_fn = nn.CrossEntropyLoss()
    n = xs.shape[0]
    samples = 0
    started = time.perf_counter()
    net.train()
    for _ in range(a.epochs):
        order = torch.randperm(n)
        for i in range(0, n - a.batch + 1, a.batch):
            idx = order[i : i + a.batch]
            x = xs[idx].unsqueeze(1).float().div_(255.0)
            loss = loss_fn(net(x), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            samples += a.batch
    train_s = time.perf_counter() - started

    acc = accuracy(net, test_x, test_y)
    print(
        json.dumps(
            {
                "model": a.model,
                "epochs": a.epochs,
                "threads": a.threads,
                "wall_s": round(time.perf_counter() - T0, 2),
                "train_s": round(train_s, 2),
                "accuracy": acc,
                "samples": samples,
            }
        )
    )


if __name__ == "__main__":
    main()
