"""Train the SmallClassifier used as the FID/KID feature network.

Reproducible on CPU: the seed fixes the initial weights, the data order and
the augmentation draws; the whole split is held in one tensor.

Examples:
    python scripts/train_classifier.py --dataset fashion-mnist --seed 0 --epochs 10 --threads 2 \\
        --out src/diffusionforge/metrics/weights/classifier_fashion-mnist.safetensors
    python scripts/train_classifier.py --dataset mnist --seed 0 --epochs 15 --threads 1 \\
        --out src/diffusionforge/metrics/weights/classifier_mnist.safetensors
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusionforge.data.datasets import build_dataset
from diffusionforge.data.folder import uint8_to_signed
from diffusionforge.metrics.classifier import ClassifierConfig, SmallClassifier, file_sha256
from diffusionforge.weights import save_weights

DATA_ROOTS = {  # dataset -> default folder with its files
    "fashion-mnist": "/work/shared/data/fashion-mnist",
    "mnist": "/work/shared/data/mnist",
}
HFLIP = {"fashion-mnist": True, "mnist": False}  # digits are not mirror-symmetric


@dataclass
class TrainConfig:
    dataset: str  # "fashion-mnist" or "mnist"
    seed: int = 0  # fixes weights init, data order and augmentation
    epochs: int = 4  # passes over the training split
    batch_size: int = 128  # images per optimizer step
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 5e-4  # AdamW decoupled weight decay
    shift: int = 2  # random-crop padding: shifts of up to +-shift pixels
    label_smoothing: float = 0.05  # cross-entropy label smoothing


def load_split(dataset: str, split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as (images (N, 1, 28, 28) in [-1, 1], labels (N,))."""
    data = build_dataset(dataset, split, root=root)
    return uint8_to_signed(data.images), data.labels


def augment(x: torch.Tensor, shift: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crops of the zero-padded ([-1]-padded) batch, optional horizontal flips.

    x: (B, C, H, W) -> (B, C, H, W)
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, value=-1.0).permute(0, 2, 3, 1)  # (B, H+2s, W+2s, C)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b, 1, 1), generator=generator)
    rows = torch.arange(h).view(1, h, 1) + dy  # (B, H, 1)
    cols = torch.arange(w).view(1, 1, w) + dx  # (B, 1, W)
    if hflip:
        flip = torch.rand(b, 1, 1, generator=generator) < 0.5
        cols = torch.where(flip, cols.flip(-1), cols)
    out = padded[torch.arange(b).view(b, 1, 1), rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def accuracy(model: SmallClassifier, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item()
                  for i in range(0, len(x), batch))
    return correct / len(x)


def train(cfg: TrainConfig, root: str) -> SmallClassifier:
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = load_split(cfg.dataset, "train", root)
    x_test, y_test = load_split(cfg.dataset, "test", root)
    model = SmallClassifier(ClassifierConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(x_train) // cfg.batch_size  # the last partial batch is dropped
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    for epoch in range(cfg.epochs):
        start, model = time.time(), model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            xb = augment(x_train[idx], cfg.shift, HFLIP[cfg.dataset], generator)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss.item():.4f} "
              f"test acc {accuracy(model, x_test, y_test):.4f} ({time.time() - start:.0f}s)", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATA_ROOTS), required=True)
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak one-cycle LR (default: %(default)s)")
    parser.add_argument("--root", default=None, help="data folder (default: /work/shared/data/<dataset>)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    cfg = TrainConfig(args.dataset, args.seed, args.epochs, args.batch_size, args.lr)
    model = train(cfg, args.root or DATA_ROOTS[args.dataset])
    x_test, y_test = load_split(cfg.dataset, "test", args.root or DATA_ROOTS[args.dataset])
    acc = accuracy(model, x_test, y_test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, args.out, metadata={"dataset": cfg.dataset, "seed": str(cfg.seed),
                                            "epochs": str(cfg.epochs), "test_accuracy": f"{acc:.4f}"})
    print(f"test accuracy {acc:.4f}\nwrote {args.out} ({args.out.stat().st_size} bytes)\n"
          f"sha256 {file_sha256(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
