"""A CNN written in PyTorch, for `meshtrain spec new --model torchscript:FILE`.

  save OUT         script the module (torch.jit.script) and save it
  eval STATE       load a `meshtrain model export` file into the module
                   (load_state_dict, strict) and print its accuracy on
                   Fashion-MNIST's 10,000 test images, as JSON
  train            train the module in plain PyTorch on the same samples a
                   mesh trains on (Adam 1e-3, batch 64), then evaluate it:
                   the baseline of docs/figures.md, as JSON

The module takes images as meshtrain hands them to every model, float
[N, 1, 28, 28] in [0, 1], and returns logits [N, 10].
"""

import argparse
import json
import os
import sys
import time

T0 = time.perf_counter()

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_baseline import accuracy as baseline_accuracy  # noqa: E402
from pytorch_baseline import find, read_idx  # noqa: E402


class SmallCnn(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def accuracy(net, data):
    test_x = read_idx(find(data, "t10k-images-idx3-ubyte"))
    test_y = read_idx(find(data, "t10k-labels-idx1-ubyte")).long()
    return baseline_accuracy(net, test_x, test_y)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("out")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--classes", type=int, default=10, help="outputs (10 for Fashion-MNIST)")
    e = sub.add_parser("eval")
    e.add_argument("state")
    e.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    t = sub.add_parser("train")
    t.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    t.add_argument("--samples", type=int, required=True)
    t.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    t.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()

    if a.cmd == "save":
        torch.manual_seed(a.seed)
        torch.jit.save(torch.jit.script(SmallCnn(a.classes)), a.out)
        return
    if a.cmd == "eval":
        from safetensors.torch import load_file

        net = SmallCnn()
        net.load_state_dict(load_file(a.state))
        print(json.dumps({"accuracy": accuracy(net, a.data)}))
        return

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    xs = read_idx(find(a.data, "train-images-idx3-ubyte"))
    ys = read_idx(find(a.data, "train-labels-idx1-ubyte")).long()
    net = SmallCnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    done = 0
    net.train()
    while done < a.samples:
        order = torch.randperm(xs.shape[0])
        for i in range(0, xs.shape[0] - 63, 64):
            if done >= a.samples:
                break
            idx = order[i : i + 64]
            loss = loss_fn(net(xs[idx].unsqueeze(1).float().div_(255.0)), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 64
    train_s = time.perf_counter() - started
    acc = accuracy(net, a.data)
    print(json.dumps({"samples": done, "train_s": round(train_s, 2), "wall_s": round(time.perf_counter() - T0, 2), "accuracy": acc}))


if __name__ == "__main__":
    main()
