"""KoeMorph's trainers (clip and sequential): audio (mel frames) -> 52 ARKit blendshapes.

Two variants, one model:

- ``clip``: mel frames ``[B, 300, 80]`` -> encoder -> multi-head attention from 52
  learned blendshape queries -> MLP decoder -> sigmoid -> ``[B, 52]``, the blendshapes of the
  window's last frame. ``BlendshapeLoss()`` with KoeMorph's weights (mse 1, l1 0.1, perceptual 0.5).
- ``sequential``: each of the B batch rows is a *stream* walking through one file; the
  model sees a causal window ending at the stream's frame, predicts that frame (``raw_pred``) and
  smooths it with its previous prediction through a learned per-blendshape factor
  ``pred = a * raw_pred + (1 - a) * prev``. The loss adds the dual-stream perceptual groups
  (mouth 12..21, expression 0..9), ``smoothing = |pred - raw_pred|`` and
  ``consistency = (pred - prev)^2`` against the same stream's previous prediction (rows that
  just moved to a new file pass ``prev = pred``, which contributes zero value and gradient).
  Streams advance by a stride that goes coarse to dense (32, 16, 8, then 1 for the last quarter),
  and the loss weights follow the sequential trainer's sparse (stride > 1) or dense (stride 1) table.

Data: a synthetic "talking" corpus (``talking_file``): visemes with their own spectral templates
drive mouth blendshapes with co-articulation lag, an emotion tilts the spectrum and sets
brow/eye blendshapes, and blinks add what the audio cannot explain. Real data: ``.npz`` files with
``mel [T, M]`` and ``blendshapes [T, K]`` at the same frame rate, values of the latter in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from ..blendshape import BlendshapeLoss
from . import data
from .engine import Task, TrainConfig

NUM_BLENDSHAPES, MEL_BINS = 52, 80
MOUTH, EXPRESSION = list(range(12, 22)), list(range(10))   # the sequential trainer's dual-stream groups
# The sequential trainer's loss weights by stride; its "temporal" weight is the consistency term here.
SPARSE_WEIGHTS = {"perceptual_weight": 0.7, "consistency_weight": 0.1, "smoothing_weight": 0.05}
DENSE_WEIGHTS = {"perceptual_weight": 0.5, "consistency_weight": 0.3, "smoothing_weight": 0.15}
STRIDES = ((0.0, 32), (0.25, 16), (0.5, 8), (0.75, 1))   # (fraction of training, stride)
FILE_FRAMES = 600


def talking_file(g: torch.Generator, frames: int = FILE_FRAMES) -> dict[str, torch.Tensor]:
    """One synthetic recording: ``mel [frames, 80]`` and ``blendshapes [frames, 52]`` in [0, 1]."""
    world = data.generator(2024)   # the "language": viseme poses and spectra, shared by every file
    visemes, emotions = 12, 3
    mouth_pose = torch.rand(visemes, len(MOUTH) + 10, generator=world) * (torch.rand(visemes, 20, generator=world) < 0.6)
    mouth_pose[0] = 0                                               # viseme 0: silence
    spectra = data.smooth_noise(world, MEL_BINS, visemes, scale=4.0).T.sigmoid() * 2   # [visemes, 80]
    spectra[0] = 0.1
    expression_pose = torch.rand(emotions, len(EXPRESSION), generator=world) * 0.8
    tilt = torch.linspace(-1, 1, MEL_BINS) * torch.tensor([-0.6, 0.0, 0.6]).view(-1, 1)   # [emotions, 80]

    # A viseme sequence of 4-15 frame segments, 20% silence; an emotion per 150-frame stretch.
    segments = []
    while sum(n for _, n in segments) < frames:
        v = 0 if torch.rand(1, generator=g).item() < 0.2 else int(torch.randint(1, visemes, (1,), generator=g))
        segments.append((v, int(torch.randint(4, 16, (1,), generator=g))))
    viseme = torch.cat([torch.full((n,), v) for v, n in segments])[:frames]
    emotion = torch.randint(0, emotions, (frames // 150 + 1,), generator=g).repeat_interleave(150)[:frames]
    loudness = 0.6 + 0.4 * data.smooth_noise(g, frames, 1, scale=10.0)[:, 0].sigmoid()

    pose = torch.zeros(frames, NUM_BLENDSHAPES)
    pose[:, MOUTH[0]:MOUTH[0] + 20] = mouth_pose[viseme] * loudness[:, None]
    pose[:, EXPRESSION] = expression_pose[emotion]
    blinks = torch.rand(frames, generator=g) < 0.01
    pose[:, 8:10] = torch.maximum(pose[:, 8:10], blinks[:, None].float())
    # Co-articulation: the face follows the sound with an exponential lag (per frame 35%).
    blendshapes = torch.empty_like(pose)
    state = pose[0]
    for t in range(frames):
        state = state + 0.35 * (pose[t] - state)
        blendshapes[t] = state
    mel = spectra[viseme] * loudness[:, None] + tilt[emotion] + 0.1 * torch.randn(frames, MEL_BINS, generator=g)
    return {"mel": mel, "blendshapes": blendshapes.clamp(0, 1)}


class BlendshapeModel(nn.Module):
    """The clip model: mel ``[B, T, M]`` -> ``[B, K]`` blendshapes of the last frame, in (0, 1).

    encoder (Linear-ReLU-Dropout-Linear per frame) -> multi-head attention from K learned
    blendshape queries over the frames -> MLP decoder (a shared hidden layer, then each
    blendshape's own linear read-out of its query's features) -> sigmoid.

    Attention is biased toward recent frames (ALiBi): head h adds ``-slope_h * age`` to its
    logits, age = frames before the last, slopes 1, 0.3, 0.09, ... and 0 for the last head (which
    sees the whole window evenly). Measured on the synthetic data: with sinusoidal positions
    instead, 300 steps did not beat predicting the mean."""

    def __init__(self, mel_bins: int = MEL_BINS, num_blendshapes: int = NUM_BLENDSHAPES, width: int = 64,
                 heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.encoder = nn.Sequential(nn.Linear(mel_bins, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width))
        self.queries = nn.Parameter(torch.randn(num_blendshapes, width) * 0.02)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.decoder = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout))
        self.readout_weight = nn.Parameter(torch.randn(num_blendshapes, width) / width**0.5)
        self.readout_bias = nn.Parameter(torch.zeros(num_blendshapes))
        self.register_buffer("slopes", torch.tensor([0.3**h for h in range(heads - 1)] + [0.0]), persistent=False)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        batch, frames = mel.shape[:2]
        queries = self.queries.unsqueeze(0).expand(batch, -1, -1)
        age = torch.arange(frames - 1, -1, -1, device=mel.device, dtype=torch.float32)
        bias = (-self.slopes[:, None] * age).to(mel.dtype)                      # [heads, T]
        bias = bias[None, :, None, :].expand(batch, -1, queries.shape[1], -1).reshape(batch * self.heads, -1, frames)
        audio = self.encoder(mel)
        attended, _ = self.attention(queries, audio, audio, attn_mask=bias.to(audio.dtype), need_weights=False)
        features = self.decoder(attended)                                        # [B, K, width]
        return torch.sigmoid(torch.einsum("bkd,kd->bk", features, self.readout_weight.to(features.dtype))
                             + self.readout_bias)


class SequentialBlendshapeModel(nn.Module):
    """The sequential variant: the clip model's last-frame prediction ``raw``, smoothed with the
    stream's previous prediction by a learned factor ``a = sigmoid(smoothing)`` per blendshape:
    ``pred = a * raw + (1 - a) * prev`` where a previous prediction exists, else ``raw``."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.frame_model = BlendshapeModel(**kwargs)
        self.smoothing = nn.Parameter(torch.zeros(self.frame_model.queries.shape[0]))

    def forward(self, mel: torch.Tensor, prev: torch.Tensor, has_prev: torch.Tensor):
        raw = self.frame_model(mel)
        a = torch.sigmoid(self.smoothing).to(raw.dtype)
        smoothed = a * raw + (1 - a) * prev.to(raw.dtype)
        return raw, torch.where(has_prev[:, None], smoothed, raw)


class _BlendshapeTask(Task):
    name = "blendshape"
    metric = "val_mse"
    keys = {"mel": (None,), "blendshapes": (None,)}

    def __init__(self, config: TrainConfig, default_window: int) -> None:
        super().__init__(config)
        self.window = config.window or default_window
        if config.data:
            self.train_files, self.val_files = data.real_corpora(config.data, self.keys, self.window)
        else:
            self.train_files = data.SyntheticCorpus(talking_file, config.seed, 0, 32)
            self.val_files = data.SyntheticCorpus(talking_file, config.seed, 1_000_000, 4)
            if self.window > FILE_FRAMES:
                raise ValueError(f"window must be <= {FILE_FRAMES} frames for the synthetic data, got {self.window}")
        first = self.train_files[0]
        self.mel_bins, self.num_blendshapes = first["mel"].shape[1], first["blendshapes"].shape[1]

    def model_kwargs(self) -> dict:
        return {"mel_bins": self.mel_bins, "num_blendshapes": self.num_blendshapes, "width": self.config.width,
                "dropout": float(self.config.extra.get("dropout", 0.1))}

    def summary(self, terms):
        return {k: v for k, v in terms.items() if k in ("total", "mse", "l1", "perceptual", "consistency")}


class ClipTask(_BlendshapeTask):
    """KoeMorph's clip trainer: a window of mel frames -> the blendshapes of its last frame."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config, default_window=300)
        self._val = None

    def build_model(self) -> nn.Module:
        return BlendshapeModel(**self.model_kwargs())

    def make_loss(self, backend: str) -> nn.Module:
        return BlendshapeLoss(mse_weight=1.0, l1_weight=0.1, perceptual_weight=0.5, backend=backend)

    def windows(self, files, g: torch.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` random windows: mel ``[count, W, M]`` and last-frame blendshapes ``[count, K]``."""
        mels, targets = [], []
        for _ in range(count):
            f = files[int(torch.randint(0, len(files), (1,), generator=g))]
            end = int(torch.randint(self.window, f["mel"].shape[0] + 1, (1,), generator=g))
            mels.append(f["mel"][end - self.window:end])
            targets.append(f["blendshapes"][end - 1])
        return torch.stack(mels), torch.stack(targets)

    def batch(self, index, device):
        mel, target = self.windows(self.train_files, data.generator(self.config.seed, 1, index), self.config.batch)
        return {"mel": mel.to(device), "target": target.to(device)}

    def forward(self, model, batch, step):
        return {"pred": model(batch["mel"]), "target": batch["target"]}

    def loss(self, loss_fn, inputs):
        return loss_fn(inputs["pred"], inputs["target"], return_components=True)

    def validate(self, model, device):
        if self._val is None:
            self._val = self.windows(self.val_files, data.generator(self.config.seed, 2), 64)
        mel, target = (t.to(device) for t in self._val)
        pred = torch.cat([model(m).float() for m in mel.split(16)])
        return {"val_mse": (pred - target).pow(2).mean().item(), "val_l1": (pred - target).abs().mean().item()}


class SequentialTask(_BlendshapeTask):
    """KoeMorph's sequential trainer: streams through files, learned smoothing, consistency, stride schedule."""

    name = "blendshape-sequential"
    VAL_FRAMES = 48

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config, default_window=64)
        self.stride = STRIDES[0][1]
        self.streams = None   # (file [B], frame [B], prev [B, K], has_prev [B]), made on first use

    def build_model(self) -> nn.Module:
        return SequentialBlendshapeModel(**self.model_kwargs())

    def make_loss(self, backend: str) -> nn.Module:
        groups = [(MOUTH, 1.0), (EXPRESSION, 1.0)] if self.num_blendshapes >= max(MOUTH) + 1 else None
        return BlendshapeLoss(mse_weight=1.0, l1_weight=0.1, perceptual_groups=groups, backend=backend,
                              **SPARSE_WEIGHTS)

    def schedule(self, step, loss_fn):
        """Coarse to dense strides, and the sparse or dense loss weights."""
        fraction = step / self.config.steps
        self.stride = [s for start, s in STRIDES if fraction >= start][-1]
        for name, value in (DENSE_WEIGHTS if self.stride == 1 else SPARSE_WEIGHTS).items():
            setattr(loss_fn, name, value)
        return {"stride": self.stride}

    def _start_streams(self) -> None:
        b = self.config.batch
        g = data.generator(self.config.seed, 3)
        files = torch.arange(b) % len(self.train_files)
        frames = torch.tensor([self.window - 1 + int(torch.randint(0, 64, (1,), generator=g)) for _ in range(b)])
        self.streams = [files, frames, torch.zeros(b, self.num_blendshapes), torch.zeros(b, dtype=torch.bool)]

    def batch(self, index, device):
        """Advance every stream by the stride; a stream past its file's end starts the next file."""
        if self.streams is None:
            self._start_streams()
        files, frames, prev, has_prev = self.streams
        frames = frames + self.stride
        for i in range(len(files)):
            if frames[i] >= self.train_files[int(files[i])]["mel"].shape[0]:
                files[i] = (files[i] + len(files)) % len(self.train_files)
                frames[i] = self.window - 1
                has_prev[i] = False
        self.streams[1] = frames
        mel = torch.stack([self.train_files[int(f)]["mel"][t - self.window + 1:t + 1] for f, t in zip(files, frames)])
        target = torch.stack([self.train_files[int(f)]["blendshapes"][t] for f, t in zip(files, frames)])
        return {"mel": mel.to(device), "target": target.to(device), "prev": prev.to(device),
                "has_prev": has_prev.clone().to(device)}

    def forward(self, model, batch, step):
        raw, pred = model(batch["mel"], batch["prev"], batch["has_prev"])
        prev = torch.where(batch["has_prev"][:, None], batch["prev"].to(pred.dtype), pred.detach())
        if self.rows == slice(None):
            self.streams[2] = pred.detach()   # stays on the device: no sync
        else:   # this rank's rows of every stream (the others' rows are theirs to keep)
            streams = self.streams[2].to(pred.device, pred.dtype, copy=True)
            streams[self.rows] = pred.detach()
            self.streams[2] = streams
        self.streams[3] = torch.ones_like(self.streams[3])
        return {"pred": pred, "target": batch["target"], "raw_pred": raw, "prev_pred": prev}

    def loss(self, loss_fn, inputs):
        return loss_fn(inputs["pred"], inputs["target"], inputs["raw_pred"], inputs["prev_pred"],
                       return_components=True)

    def validate(self, model, device):
        """Each validation file read densely (stride 1) for VAL_FRAMES frames, smoothing carried."""
        files = [self.val_files[i] for i in range(len(self.val_files))]
        frames = min(self.VAL_FRAMES, min(f["mel"].shape[0] for f in files) - self.window + 1)
        prev = torch.zeros(len(files), self.num_blendshapes, device=device)
        has_prev = torch.zeros(len(files), dtype=torch.bool, device=device)
        errors, raw_errors = [], []
        for t in range(self.window - 1, self.window - 1 + frames):
            mel = torch.stack([f["mel"][t - self.window + 1:t + 1] for f in files]).to(device)
            target = torch.stack([f["blendshapes"][t] for f in files]).to(device)
            raw, pred = model(mel, prev, has_prev)
            errors.append((pred.float() - target).pow(2).mean())
            raw_errors.append((raw.float() - target).pow(2).mean())
            prev, has_prev = pred.float(), torch.ones_like(has_prev)
        return {"val_mse": torch.stack(errors).mean().item(), "val_mse_raw": torch.stack(raw_errors).mean().item()}

    def state_dict(self):
        return {"streams": None if self.streams is None else [t.cpu() for t in self.streams]}

    def load_state_dict(self, state):
        self.streams = state["streams"]

    def merge_states(self, states):
        """Each rank keeps its own rows of the previous predictions: the checkpoint takes them from it."""
        merged = states[0]["streams"]
        if merged is not None:
            merged = [t.clone() for t in merged]
            for rows, state in zip(self.rows_by_rank, states):
                merged[2][rows] = state["streams"][2][rows]
        return {"streams": merged}


def make_task(config: TrainConfig) -> Task:
    if config.variant not in ("", "clip", "sequential"):
        raise ValueError(f"variant must be 'clip' or 'sequential' for the blendshape trainer, got {config.variant!r}")
    return SequentialTask(config) if config.variant == "sequential" else ClipTask(config)
