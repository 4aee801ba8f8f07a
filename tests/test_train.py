"""mobilequant.train: determinism, augmentation, precise-BN statistics, evaluation."""

from __future__ import annotations

import torch
import torch.nn as nn

from mobilequant.data import ImageData, calibration_set
from mobilequant.train import _augment, evaluate, recompute_bn_stats, train_classifier


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16, momentum=0.01),
                         nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.1), nn.Linear(128, 10))


def test_training_is_reproducible_and_learns():
    data = calibration_set()  # 512 labelled Fashion-MNIST images shipped with the package

    def run(seed):
        torch.manual_seed(seed)
        model = _tiny()
        history = train_classifier(model, data, epochs=4, batch_size=64, lr=0.2, seed=seed, progress=False,
                                   crop_padding=2, precise_bn_images=256)
        return model, history

    a, history = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert len(history.epochs) == 4 and history.epochs[-1].loss < history.epochs[0].loss
    assert not a.training
    assert evaluate(a, data) > 0.5  # chance is 0.1
    assert torch.get_num_threads() >= 1 and not torch.are_deterministic_algorithms_enabled()


def test_recompute_bn_stats_is_the_plain_average():
    bn = nn.BatchNorm2d(3, momentum=0.01)
    model = nn.Sequential(bn)
    x = torch.randn(64, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0])[None, :, None, None] + 5
    recompute_bn_stats(model, ImageData(x, None, "t"), batch_size=16)
    batch_means = torch.stack([x[i:i + 16].mean((0, 2, 3)) for i in range(0, 64, 16)])
    batch_vars = torch.stack([x[i:i + 16].var((0, 2, 3), unbiased=True) for i in range(0, 64, 16)])
    torch.testing.assert_close(bn.running_mean, batch_means.mean(0))
    torch.testing.assert_close(bn.running_var, batch_vars.mean(0))
    assert bn.momentum == 0.01 and model.training


def test_augment_translates_and_flips_within_bounds():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    gen = torch.Generator().manual_seed(0)
    seen_shift = False
    for _ in range(20):
        y = _augment(x, 2, False, gen)
        assert y.shape == x.shape
        # Every output pixel comes from the replicate-padded input: values stay within each image's range.
        assert torch.all(y[0] <= x[0].max()) and torch.all(y[0] >= x[0].min())
        seen_shift |= not torch.equal(y, x)
    assert seen_shift
    flipped = [torch.equal(_augment(x, 0, True, gen)[0], x[0].flip(-1)) for _ in range(20)]
    assert any(flipped) and not all(flipped)
