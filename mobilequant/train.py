"""Reproducible classifier training and evaluation (the recipe of the shipped Fashion-MNIST weights).

Recipe: SGD with Nesterov momentum 0.9, one-cycle learning rate (warm-up 15 % of the steps, cosine
down), weight decay on conv / linear weights only, cross-entropy with label smoothing 0.1, and light
augmentation done on the normalised tensors: a horizontal flip, and optionally a random crop with
``crop_padding`` pixels of replicated border (Fashion-MNIST's 32×32 images have a black 2-pixel border,
so the replicated border is black too). The crop is off by default: in ten-epoch schedules it cost
accuracy (MobileNetV2 0.5, 15k images × 3 epochs: 81.9 % with a 2-pixel crop, 83.7 % without), and a
peak rate of 0.05 beat 0.2 and 0.02 there (65.5 % and 78.4 %).

After the last epoch the BatchNorm statistics are recomputed with the final weights ("precise BN", Wu &
Johnson 2021): a plain average over ``precise_bn_images`` un-augmented training images. The running
averages kept during training lag behind the weights; with MobileNetV3's BN momentum of 0.01 that lag
left an eval-mode model at chance level after a short schedule, while the same model in train mode was
at 75 %.

Same seed, same data, same thread count → the same weights: shuffling and augmentation draw from one
seeded ``torch.Generator``, the model's own randomness (dropout) from ``torch.manual_seed(seed)``,
deterministic algorithms are requested, and the thread count is fixed (2 by default) while training.
Build the model after ``torch.manual_seed(seed)`` too, so its initial weights are reproducible.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageData

__all__ = ["EpochStats", "TrainHistory", "evaluate", "recompute_bn_stats", "train_classifier"]


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float  # mean training loss (with label smoothing) over the epoch
    train_accuracy: float  # on the augmented training batches, in train mode
    seconds: float
    eval_accuracy: float | None = None


@dataclass
class TrainHistory:
    epochs: list[EpochStats] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.epochs)


@contextlib.contextmanager
def _reproducible(threads: int) -> Iterator[None]:
    """Fix the thread count and ask for deterministic kernels; restore both afterwards."""
    old_threads = torch.get_num_threads()
    old_det, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def _augment(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random ``padding``-pixel translation (crop of a replicate-padded batch) and horizontal flip."""
    n, c, h, w = x.shape
    if padding:
        padded = F.pad(x, (padding,) * 4, mode="replicate")
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights; none on biases and norm parameters (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_classifier(
    model: nn.Module,
    train_data: ImageData,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    *,
    weight_decay: float = 5e-5,
    label_smoothing: float = 0.1,
    crop_padding: int = 0,
    hflip: bool = True,
    warmup_fraction: float = 0.15,
    optimizer: str = "sgd",
    threads: int = 2,
    precise_bn_images: int = 10_000,
    eval_data: ImageData | None = None,
    progress: bool = True,
) -> TrainHistory:
    """Train ``model`` in place on labelled ``train_data`` for ``epochs`` epochs; returns per-epoch stats.

    ``optimizer``: "sgd" (Nesterov momentum 0.9) or "adamw" (for networks without BatchNorm, such as
    SqueezeNet, where SGD's ReLUs died in our runs; pair it with a decoupled ``weight_decay`` such as
    0.05 and ``lr`` about 1e-3). ``lr`` is the one-cycle peak learning rate; ``eval_data`` (optional) is evaluated after each epoch
    for the log only (the returned model is always the last epoch's). ``progress``: a per-batch bar on
    a terminal and one line per epoch. The last, incomplete batch of an epoch is dropped (BatchNorm
    dislikes tiny batches).

    On a machine shared with other jobs, set ``OMP_WAIT_POLICY=PASSIVE`` before torch is imported:
    OpenMP threads that spin while waiting for a descheduled partner make training several times slower.
    """
    from tqdm import tqdm

    if train_data.labels is None:
        raise ValueError(f"training needs labels; {train_data.source} has none")
    if epochs < 1 or len(train_data) < batch_size:
        raise ValueError(f"need epochs ≥ 1 and at least one full batch of {batch_size}, got {epochs} epochs, "
                         f"{len(train_data)} images")
    steps_per_epoch = len(train_data) // batch_size
    total_steps = epochs * steps_per_epoch
    groups = _param_groups(model, weight_decay)
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")

    def lr_at(step: int) -> float:  # one-cycle: linear warm-up from lr/25, cosine down to lr/1e4
        warm = max(1, round(warmup_fraction * total_steps))
        if step < warm:
            return lr / 25 + (lr - lr / 25) * step / warm
        t = (step - warm) / max(1, total_steps - warm)
        return lr / 1e4 + (lr - lr / 1e4) * 0.5 * (1 + math.cos(math.pi * t))

    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    gen = torch.Generator().manual_seed(seed)
    history = TrainHistory()
    step = 0
    model.to(memory_format=torch.channels_last)  # about twice as fast on CPU (oneDNN) for these nets
    with _reproducible(threads):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            model.train()
            order = torch.randperm(len(train_data), generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", leave=False, unit="batch",
                       disable=None if progress else True)  # None: no bar when stderr is not a terminal
            for b in bar:
                idx = order[b * batch_size:(b + 1) * batch_size]
                x = _augment(train_data.images[idx], crop_padding, hflip, gen)
                x = x.contiguous(memory_format=torch.channels_last)
                y = train_data.labels[idx]
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
                logits = model(x)
                loss = criterion(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                if b % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            if epoch == epochs:
                n_bn = min(precise_bn_images, len(train_data)) // batch_size * batch_size  # full batches only
                recompute_bn_stats(model, train_data.subset(order[:n_bn]), batch_size)
            seconds = time.perf_counter() - start
            eval_acc = evaluate(model, eval_data, threads=threads) if eval_data is not None else None
            stats = EpochStats(epoch, loss_sum / seen, correct / seen, seconds, eval_acc)
            history.epochs.append(stats)
            if progress:
                shown = "" if eval_acc is None else f", eval acc {eval_acc * 100:.2f} %"
                tqdm.write(f"epoch {epoch}/{epochs}: loss {stats.loss:.4f}, train acc {stats.train_accuracy * 100:.2f} %"
                           f"{shown}, {seconds:.0f} s")
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, data: ImageData, batch_size: int = 128) -> None:
    """Replace every BatchNorm's running mean / variance by their plain average over ``data`` (no augmentation).

    The model runs in train mode without gradients; nothing but the BN buffers changes. Each batch's
    statistics are averaged with equal weight (``momentum=None``), so the result does not depend on a
    momentum.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for x, _ in data.batches(batch_size):
            model(x.contiguous(memory_format=torch.channels_last))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 1000, threads: int | None = None) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` in eval mode on labelled ``data``."""
    if data.labels is None:
        raise ValueError(f"evaluation needs labels; {data.source} has none")
    was_training = model.training
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    model.eval()
    try:
        correct = 0
        for x, y in data.batches(batch_size):
            correct += int((model(x).argmax(1) == y).sum())
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
    return correct / len(data)
