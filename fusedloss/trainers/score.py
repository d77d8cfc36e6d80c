"""TIGAS's trainer: a small CNN scores images as real (1) or generated (0), with a
sigmoid score head and a two-class head, trained with ``CombinedLoss`` (regression +
classification + all-pairs margin ranking) and its fail-fast on NaN/Inf; mixed precision on
GPUs (the engine's ``amp``), gradient accumulation (``accum``) and clipping.

Data: a synthetic corpus (``image_file``). Real images are random fields with a natural
1/f^1.5 spectrum and correlated colours; generated ones are made the way upsampling generators
make them: a half-resolution field, nearest-neighbour upsampled (blocky), plus a faint
checkerboard, each with a random strength. Real data: ``.npz`` files with ``images [N, 3, H, W]``
(uint8 0..255 or float 0..1) and ``labels [N]`` (floats in [0, 1], 1 = real).
"""

from __future__ import annotations

import torch
from torch import nn

from ..score import CombinedLoss
from . import data
from .engine import Task, TrainConfig

IMAGE_SIZE, IMAGES_PER_FILE = 32, 256


def natural_field(g: torch.Generator, count: int, size: int) -> torch.Tensor:
    """``[count, 3, size, size]`` random fields with a 1/f^1.5 amplitude spectrum, colours mixed."""
    fy = torch.fft.fftfreq(size).abs().view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    amplitude = 1 / (torch.sqrt(fx**2 + fy**2) + 1 / size) ** 1.5
    spectrum = torch.complex(torch.randn(count, 3, size, size // 2 + 1, generator=g),
                             torch.randn(count, 3, size, size // 2 + 1, generator=g)) * amplitude
    field = torch.fft.irfft2(spectrum, s=(size, size))
    field = field / field.flatten(1).std(1).view(-1, 1, 1, 1)
    colours = torch.eye(3) * 0.5 + 0.5 * torch.rand(count, 3, 3, generator=g)
    return torch.sigmoid(torch.einsum("nij,njhw->nihw", colours, field))


def image_file(g: torch.Generator, count: int = IMAGES_PER_FILE, size: int = IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """Half real, half generated images in random order, with labels 1 (real) and 0 (generated)."""
    real = torch.rand(count, generator=g) < 0.5
    images = natural_field(g, count, size)
    coarse = natural_field(g, count, size // 2).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    strength = 0.05 + 0.45 * torch.rand(count, 1, 1, 1, generator=g)
    checker = ((torch.arange(size).view(-1, 1) + torch.arange(size)) % 2 * 2 - 1).float()
    fake = (strength * coarse + (1 - strength) * images + 0.02 * strength * checker).clamp(0, 1)
    images = torch.where(real.view(-1, 1, 1, 1), images, fake)
    return {"images": images, "labels": real.float()}


class ScoreNet(nn.Module):
    """images ``[B, 3, H, W]`` -> ``{"score": [B, 1] in (0, 1), "logits": [B, 2]}``: three
    stride-2 conv-BN-ReLU stages, global average pooling, a sigmoid score head and a class head."""

    def __init__(self, width: int = 64, norm: str = "batch") -> None:
        super().__init__()
        half = max(8, width // 2)
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")

        def normalise(channels):  # "group": no batch statistics (each image alone; data-parallel runs on CPU)
            return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(4, channels)

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), normalise(cout), nn.ReLU()]

        self.features = nn.Sequential(nn.Conv2d(3, half, 3, padding=1, bias=False), normalise(half), nn.ReLU(),
                                      *stage(half, width), *stage(width, width), *stage(width, width),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.score_head = nn.Sequential(nn.Linear(width, half), nn.ReLU(), nn.Linear(half, 1), nn.Sigmoid())
        self.class_head = nn.Linear(width, 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {"score": self.score_head(features), "logits": self.class_head(features)}


def pairwise_auc(scores: torch.Tensor, real: torch.Tensor) -> float:
    """Fraction of (real, generated) pairs ordered correctly (ties count half): the ROC AUC."""
    ranks = torch.empty_like(scores, dtype=torch.float64)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64, device=scores.device)
    for value in scores.unique()[scores.unique(return_counts=True)[1] > 1]:   # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_real, n_fake = int(real.sum()), int((~real).sum())
    if n_real == 0 or n_fake == 0:
        return float("nan")
    return ((ranks[real].sum() - n_real * (n_real + 1) / 2) / (n_real * n_fake)).item()


class ScoreTask(Task):
    name = "score"
    metric = "val_auc"
    higher_is_better = True
    keys = {"images": (3, None, None), "labels": ()}

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        if config.data:
            self.train_files, self.val_files = data.real_corpora(config.data, self.keys, 1)
        else:
            self.train_files = data.SyntheticCorpus(image_file, config.seed, 0, 16)
            self.val_files = data.SyntheticCorpus(image_file, config.seed, 1_000_000, 2)

    def build_model(self) -> nn.Module:
        return ScoreNet(self.config.width, norm=self.config.extra.get("norm", "batch"))

    def make_loss(self, backend: str) -> nn.Module:
        return CombinedLoss(regression_weight=1.0, classification_weight=0.3, ranking_weight=0.2,
                            regression_type="mse", check_finite=True, backend=backend)

    def batch(self, index, device):
        g = data.generator(self.config.seed, 1, index)
        picks = [(int(torch.randint(0, len(self.train_files), (1,), generator=g)),
                  int(torch.randint(0, 2**31 - 1, (1,), generator=g))) for _ in range(self.config.batch)]
        files = [self.train_files[f] for f, _ in picks]
        rows = [r % f["images"].shape[0] for (_, r), f in zip(picks, files)]
        images = torch.stack([f["images"][r] for f, r in zip(files, rows)])
        labels = torch.stack([f["labels"][r] for f, r in zip(files, rows)])
        return {"images": images.to(device), "labels": labels.to(device)}

    def forward(self, model, batch, step):
        out = model(batch["images"])
        return {"scores": out["score"].squeeze(-1), "logits": out["logits"], "labels": batch["labels"]}

    def loss(self, loss_fn, inputs):
        return loss_fn(scores=inputs["scores"], logits=inputs["logits"], labels=inputs["labels"])

    def validate(self, model, device):
        images = torch.cat([self.val_files[i]["images"] for i in range(len(self.val_files))])
        labels = torch.cat([self.val_files[i]["labels"] for i in range(len(self.val_files))]).to(device)
        outputs = [model(chunk.to(device)) for chunk in images.split(256)]
        scores = torch.cat([o["score"].float().squeeze(-1) for o in outputs])
        logits = torch.cat([o["logits"].float() for o in outputs])
        real = labels > 0.5
        return {"val_auc": pairwise_auc(scores, real),
                "val_accuracy": (logits.argmax(1) == real.long()).float().mean().item(),
                "val_mse": (scores - labels).pow(2).mean().item()}
