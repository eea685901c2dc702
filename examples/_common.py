"""Helpers shared by the examples: the digits data, a tqdm training loop, a loss plot.

Nothing here is LoRA-specific; the LoRA steps live in each example so a reader sees them whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


class Split(NamedTuple):
    """Images ``(n, 8, 8, 1)`` in [0, 1] and labels ``0 .. len(classes) - 1``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(classes: Sequence[int], seed: int = 0, test_fraction: float = 0.3) -> Split:
    """scikit-learn's 8x8 handwritten digits (1,797 images, ships with sklearn, no download).

    Keeps the images of ``classes`` and relabels them ``0 .. len(classes) - 1`` in the given
    order (digits 5-9 become labels 0-4), then splits them into a training and a held-out test
    set with a fixed seed, stratified by class.

    Args:
      classes: the digits to keep, e.g. ``range(5)``.
      seed: the seed of the split.
      test_fraction: the held-out fraction of each class.

    Returns:
      A `Split` of float32 images and int32 labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    classes = list(classes)
    keep = np.isin(data.target, classes)
    x = (data.images[keep] / 16.0).astype(np.float32)[..., None]
    y = np.array([classes.index(t) for t in data.target[keep]], np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Split(x_tr, y_tr, x_te, y_te)


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``steps`` minibatches, drawn epoch by epoch from a seeded permutation."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(x))])
        idx, order = order[:batch_size], order[batch_size:]
        yield x[idx], y[idx]


def fit(
    step: Callable[[Any, np.ndarray, np.ndarray], tuple[Any, Any]],
    carry: Any,
    x: np.ndarray,
    y: np.ndarray,
    steps: int,
    batch_size: int,
    seed: int,
    desc: str,
) -> tuple[Any, list[float]]:
    """Runs ``carry, loss = step(carry, xb, yb)`` over minibatches with a tqdm progress bar.

    Returns:
      The final carry and the loss of every step.
    """
    from tqdm.auto import tqdm

    losses: list[float] = []
    bar = tqdm(
        batches(x, y, batch_size, steps, seed),
        total=steps,
        desc=desc,
        disable=os.environ.get("TQDM_DISABLE") == "1",
    )
    for i, (xb, yb) in enumerate(bar):
        carry, loss = step(carry, xb, yb)
        losses.append(float(loss))
        if i % 20 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return carry, losses


def accuracy(logits: Any, y: np.ndarray) -> float:
    """The fraction of rows whose arg-max logit is the label."""
    return float(np.mean(np.asarray(logits).argmax(-1) == y))


def plot_losses(curves: dict[str, list[float]], path: Path, title: str) -> Path:
    """Plots one loss curve per phase, side by side on a log scale, and saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, losses) in zip(axes[0], curves.items(), strict=True):
        ax.plot(np.arange(1, len(losses) + 1), losses, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (train batch)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
