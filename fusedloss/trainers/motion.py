"""Ditto's trainer: a transformer denoiser for talking-head motion, diffusion with x0
prediction, trained with ``PVALoss`` (six parts, position / velocity / acceleration, plus the
last-frame term against the condition frame) on 265-dim motion of 80 frames.

A training sample is a clip of 81 frames: the first is the condition frame (the last frame
already generated), the next 80 are the target ``x0``. The diffusion time ``t`` and the noise are
drawn per sample; the model sees ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``, the audio
features of the 80 frames, the condition frame and ``t``, and predicts ``x0``.

Data: a synthetic corpus (``motion_file``): audio features drive the expression (lip sync) and
nod the head; pitch / yaw / roll are 66-bin Gaussian codes of smooth head angles; translation
and scale drift slowly. Real data: ``.npz`` files with ``audio [T, A]`` and ``motion [T, 265]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..pva import PVALoss
from . import data
from .engine import Task, TrainConfig

MOTION_DIM, AUDIO_DIM, FRAMES = 265, 32, 80
DIFFUSION_STEPS = 1000
FILE_FRAMES = 400
VALIDATION_TIMES = (50, 200, 400, 600, 800)


def motion_file(g: torch.Generator, frames: int = FILE_FRAMES) -> dict[str, torch.Tensor]:
    """One synthetic recording: ``audio [frames, 32]`` and ``motion [frames, 265]`` in Ditto's
    layout: scale [0, 1), pitch [1, 67), yaw [67, 133), roll [133, 199), t [199, 202), exp [202, 265)."""
    world = data.generator(2002)   # shared by every file: how audio moves the face
    lip_sync = torch.randn(AUDIO_DIM, 63, generator=world) / math.sqrt(AUDIO_DIM)
    nod = torch.randn(AUDIO_DIM, generator=world) / math.sqrt(AUDIO_DIM)

    audio = data.smooth_noise(g, frames, AUDIO_DIM, scale=2.0)
    energy = data.smooth_noise(g, frames, 1, scale=3.0)[:, 0]
    angles = torch.stack([5 * data.smooth_noise(g, frames, 1, scale=8.0)[:, 0] + 3 * torch.tanh(audio @ nod),
                          12 * data.smooth_noise(g, frames, 1, scale=15.0)[:, 0],
                          3 * data.smooth_noise(g, frames, 1, scale=10.0)[:, 0]], dim=1)   # degrees
    bins = torch.linspace(-99, 99, 66)
    codes = torch.exp(-0.5 * ((angles[:, :, None] - bins) / 6.0) ** 2)              # [frames, 3, 66]
    motion = torch.cat([
        1 + 0.05 * data.smooth_noise(g, frames, 1, scale=40.0),
        codes.reshape(frames, 3 * 66),
        0.1 * data.smooth_noise(g, frames, 3, scale=20.0),
        0.6 * torch.tanh(audio @ lip_sync * (0.7 + 0.3 * energy.sigmoid())[:, None]) + 0.2 * torch.randn(63, generator=g),
    ], dim=1)
    return {"audio": audio, "motion": motion}


def cosine_alpha_bar(steps: int = DIFFUSION_STEPS) -> torch.Tensor:
    """abar_t of the cosine schedule (Nichol & Dhariwal), t = 0..steps-1, float64."""
    s = 0.008
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (f[1:] / f[0]).clamp(1e-5, 1.0)


def timestep_code(t: torch.Tensor, width: int) -> torch.Tensor:
    """Sinusoidal code of the diffusion time ``t`` ``[B]`` -> ``[B, width]``."""
    half = width // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angle = t.float()[:, None] * freq
    return torch.cat([angle.sin(), angle.cos()], dim=1)


class MotionDenoiser(nn.Module):
    """x_t ``[B, L, D]``, audio ``[B, L, A]``, condition frame ``[B, D]``, t ``[B]`` -> x0 ``[B, L, D]``.

    Per frame: ``in(x_t) + audio(a) + cond(c) + time(t) + position``, then a pre-norm transformer
    encoder over the L frames and a linear read-out F, added to the best linear denoiser for data
    of per-dimension mean m and variance v: ``x0 = m + c_t (x_t - sqrt(abar_t) m) + F`` with
    ``c_t = sqrt(abar_t) v / (abar_t v + 1 - abar_t)``. The network learns only the residual;
    without this skip, 200 steps on the synthetic data did not beat predicting the mean."""

    def __init__(self, motion_dim: int = MOTION_DIM, audio_dim: int = AUDIO_DIM, width: int = 64,
                 layers: int = 2, heads: int = 4, max_frames: int = 512, dropout: float = 0.1,
                 mean: torch.Tensor | None = None, variance: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(motion_dim) if mean is None else mean.float().clone())
        self.variance = float(variance)
        self.width = width
        self.motion_in = nn.Linear(motion_dim, width)
        self.audio_in = nn.Linear(audio_dim, width)
        self.cond_in = nn.Linear(motion_dim, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.position = nn.Parameter(torch.randn(max_frames, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, motion_dim))
        nn.init.zeros_(self.out[1].weight)   # start as the linear denoiser (F = 0)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x_t, audio, cond_frame, t, abar):
        frames = x_t.shape[1]
        h = (self.motion_in(x_t) + self.audio_in(audio) + self.cond_in(cond_frame)[:, None]
             + self.time(timestep_code(t, self.width).to(x_t.dtype))[:, None] + self.position[:frames])
        a = abar.float()[:, None, None]
        skip = a.sqrt() * self.variance / (a * self.variance + 1 - a)
        linear = self.mean + skip * (x_t.float() - a.sqrt() * self.mean)
        return linear.to(x_t.dtype) + self.out(self.transformer(h))


class MotionTask(Task):
    name = "motion"
    metric = "val_x0_mse"
    keys = {"audio": (None,), "motion": (MOTION_DIM,)}

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.frames = config.window or FRAMES
        if config.data:
            self.train_files, self.val_files = data.real_corpora(config.data, self.keys, self.frames + 1)
        else:
            if self.frames + 1 > FILE_FRAMES:
                raise ValueError(f"window must be < {FILE_FRAMES} frames for the synthetic data, got {self.frames}")
            self.train_files = data.SyntheticCorpus(motion_file, config.seed, 0, 32)
            self.val_files = data.SyntheticCorpus(motion_file, config.seed, 1_000_000, 4)
        self.audio_dim = self.train_files[0]["audio"].shape[1]
        self.alpha_bar = cosine_alpha_bar()
        self._val = None

    def build_model(self) -> nn.Module:
        motion = torch.cat([self.train_files[i]["motion"] for i in range(min(8, len(self.train_files)))])
        mean = motion.mean(0)
        return MotionDenoiser(audio_dim=self.audio_dim, width=self.config.width, max_frames=max(512, self.frames),
                              mean=mean, variance=(motion - mean).pow(2).mean().item(),
                              dropout=float(self.config.extra.get("dropout", 0.1)))

    def make_loss(self, backend: str) -> nn.Module:
        return PVALoss(use_last_frame_loss=True, backend=backend)   # Ditto's six parts, weight 1

    def clips(self, files, g: torch.Generator, count: int, times=None) -> dict[str, torch.Tensor]:
        """``count`` clips of 1 + L frames, noised at random (or the given) diffusion times."""
        audio, motion = [], []
        for _ in range(count):
            f = files[int(torch.randint(0, len(files), (1,), generator=g))]
            start = int(torch.randint(0, f["motion"].shape[0] - self.frames, (1,), generator=g))
            audio.append(f["audio"][start + 1:start + 1 + self.frames])
            motion.append(f["motion"][start:start + 1 + self.frames])
        motion = torch.stack(motion)
        x0 = motion[:, 1:]
        t = torch.randint(0, DIFFUSION_STEPS, (count,), generator=g) if times is None else times
        abar = self.alpha_bar[t].float()
        noise = torch.randn(x0.shape, generator=g)
        x_t = abar.sqrt().view(-1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1) * noise
        return {"x_t": x_t, "audio": torch.stack(audio), "cond_frame": motion[:, 0], "t": t, "abar": abar, "x0": x0}

    def batch(self, index, device):
        clips = self.clips(self.train_files, data.generator(self.config.seed, 1, index), self.config.batch)
        return {k: v.to(device) for k, v in clips.items()}

    def forward(self, model, batch, step):
        pred = model(batch["x_t"], batch["audio"], batch["cond_frame"], batch["t"], batch["abar"])
        return {"pred": pred, "target": batch["x0"], "cond_frame": batch["cond_frame"]}

    def loss(self, loss_fn, inputs):
        return loss_fn(inputs["pred"], inputs["target"], inputs["cond_frame"])

    def summary(self, terms):
        """The 24 terms summed by kind (P, V, A, L) for the progress bar."""
        sums = {"total": terms["total"]}
        for kind in "PVAL":
            sums[f"sum_{kind}"] = sum(v for k, v in terms.items() if k.endswith(f"_{kind}"))
        return sums

    def validate(self, model, device):
        """x0 error of fixed noised validation clips, at fixed diffusion times."""
        if self._val is None:
            per_time = 8
            times = torch.tensor(VALIDATION_TIMES).repeat_interleave(per_time)
            self._val = self.clips(self.val_files, data.generator(self.config.seed, 2), len(times), times)
        clips = {k: v.to(device) for k, v in self._val.items()}
        pred = model(clips["x_t"], clips["audio"], clips["cond_frame"], clips["t"], clips["abar"]).float()
        error = pred - clips["x0"]
        return {"val_x0_mse": error.pow(2).mean().item(),
                "val_velocity_mse": (error[:, 1:] - error[:, :-1]).pow(2).mean().item()}
