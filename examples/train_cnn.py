"""Train a small convolutional network on scikit-learn's 8x8 handwritten digits, on the CPU, in well under a minute.

    python examples/train_cnn.py [--epochs 10]

The 1797 digits ship inside scikit-learn (no download): pip install scikit-learn. A fifth of them, held out, measure
the accuracy; the network reaches about 98%.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import tinytf
import tinytf.nn.functional as F
from tinytf import nn
from tinytf.optim import AdamW


class DigitsCNN(nn.Module):
    """conv-norm-relu twice, a 2x2 max pool, then one linear layer to the 10 classes."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.norm2 = nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x: tinytf.Tensor) -> tinytf.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))  # (B, 1, 8, 8) -> (B, w, 8, 8)
        x = self.pool(F.relu(self.norm2(self.conv2(x))))  # -> (B, 2w, 8, 8) -> (B, 2w, 4, 4)
        return self.head(x.flatten(1))  # -> (B, 2w * 16) -> (B, 10)


def load_digits_split(seed: int, test_fraction: float = 0.2):
    """(train images, train labels, test images, test labels): images (N, 1, 8, 8) float32 scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("examples/train_cnn.py needs scikit-learn for its digits data set: pip install scikit-learn")
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    order = np.random.default_rng(seed).permutation(len(images))
    test_count = int(len(images) * test_fraction)
    test, train = order[:test_count], order[test_count:]
    return images[train], digits.target[train], images[test], digits.target[test]


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with tinytf.no_grad():
        predicted = model(tinytf.tensor(images)).numpy().argmax(axis=1)
    model.train()
    return float((predicted == labels).mean())


def train(epochs: int = 10, batch_size: int = 32, lr: float = 3e-3, seed: int = 0, log: bool = True) -> float:
    """Train from a fixed seed and return the test accuracy."""
    tinytf.manual_seed(seed)
    train_images, train_labels, test_images, test_labels = load_digits_split(seed)
    model = DigitsCNN()
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    shuffle = np.random.default_rng(seed)
    for epoch in range(epochs):
        # Anneal the learning rate to zero by the last epoch: the last steps settle instead of bouncing around.
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * epoch / epochs))
        order = shuffle.permutation(len(train_images))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(tinytf.tensor(train_images[batch])), tinytf.tensor(train_labels[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if log:
            print(f"epoch {epoch + 1:2d}  last batch loss {loss.item():.4f}  "
                  f"test accuracy {accuracy(model, test_images, test_labels):.4f}")
    return accuracy(model, test_images, test_labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    test_accuracy = train(args.epochs, seed=args.seed)
    print(f"test accuracy {test_accuracy:.4f} after {args.epochs} epochs in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
