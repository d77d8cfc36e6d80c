"""Data for the trainers: corpora of files, synthetic or real.

A *corpus* is a sequence of files; file ``i`` is a dict ``name -> tensor`` whose first dimension
is the frame (or sample) axis. The trainers read windows out of it, so the synthetic corpora
(generated on the fly, deterministic from a seed) and real data in ``.npz`` files are
interchangeable.

Real data: a folder of ``.npz`` files (``numpy.savez``), each holding the arrays a trainer names
(``blendshape``: ``mel [T, 80]`` and ``blendshapes [T, 52]``; ``motion``: ``audio [T, A]`` and
``motion [T, 265]``; ``score``: ``images [N, 3, H, W]`` and ``labels [N]``). The last
``val_fraction`` of the files (sorted by name, at least one) is the validation split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded from several integers (a seed, a file or batch number...)."""
    value = 0
    for s in seeds:
        value = (value * 1_000_003 + int(s)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class SyntheticCorpus:
    """``count`` files made by ``make(generator) -> dict`` from seeds ``(seed, first + i)``,
    generated on first use and kept."""

    def __init__(self, make: Callable[[torch.Generator], dict], seed: int, first: int, count: int) -> None:
        self.make, self.seed, self.first, self.count = make, seed, first, count
        self._files: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        if i not in self._files:
            self._files[i] = self.make(generator(self.seed, self.first + i))
        return self._files[i]


class NpzCorpus:
    """Files of a folder of ``.npz`` archives, each with the arrays ``keys`` (checked on load):
    float arrays with equal first dimension, at least ``min_length`` long."""

    def __init__(self, paths: Sequence[Path], keys: dict[str, tuple], min_length: int) -> None:
        self.paths, self.keys, self.min_length = list(paths), keys, min_length
        self._files: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._files:
            import numpy as np

            path = self.paths[i]
            with np.load(path) as archive:
                missing = [k for k in self.keys if k not in archive]
                if missing:
                    raise ValueError(f"{path}: missing arrays {missing} (expected {describe(self.keys)})")
                arrays = {k: torch.from_numpy(np.asarray(archive[k])) for k in self.keys}
            lengths = set()
            for name, trailing in self.keys.items():
                a = arrays[name]
                if a.dim() != 1 + len(trailing) or any(t is not None and t != s for t, s in zip(trailing, a.shape[1:])):
                    raise ValueError(f"{path}: {name} has shape {tuple(a.shape)}, expected {describe({name: trailing})}")
                if name != "images" and not a.is_floating_point():
                    raise ValueError(f"{path}: {name} must be a float array, got {a.dtype}")
                lengths.add(a.shape[0])
            if len(lengths) != 1 or lengths.pop() < self.min_length:
                raise ValueError(f"{path}: the arrays must have one common length >= {self.min_length}, "
                                 f"got {[tuple(a.shape) for a in arrays.values()]}")
            self._files[i] = {k: a.float() / 255 if k == "images" and not a.is_floating_point() else a.float()
                              for k, a in arrays.items()}
        return self._files[i]


def describe(keys: dict[str, tuple]) -> str:
    return ", ".join(f"{k} [N, {', '.join('*' if t is None else str(t) for t in trailing)}]".replace(", ]", "]")
                     for k, trailing in keys.items())


def real_corpora(folder: str, keys: dict[str, tuple], min_length: int,
                 val_fraction: float = 0.1) -> tuple[NpzCorpus, NpzCorpus]:
    """(train, validation) corpora from the ``.npz`` files of ``folder``."""
    paths = sorted(Path(folder).glob("*.npz"))
    if len(paths) < 2:
        raise ValueError(f"data={folder!r}: need at least two .npz files (train and validation), found {len(paths)}")
    n_val = max(1, round(val_fraction * len(paths)))
    return NpzCorpus(paths[:-n_val], keys, min_length), NpzCorpus(paths[-n_val:], keys, min_length)


def smooth_noise(g: torch.Generator, length: int, channels: int, scale: float) -> torch.Tensor:
    """``[length, channels]`` smooth random signals: white noise low-passed by a Gaussian of
    width ``scale`` frames, normalised to unit standard deviation."""
    width = max(1, int(3 * scale))
    kernel = torch.exp(-0.5 * (torch.arange(-width, width + 1) / scale) ** 2)
    noise = torch.randn(channels, 1, length + 2 * width, generator=g)
    out = torch.nn.functional.conv1d(noise, (kernel / kernel.norm()).view(1, 1, -1)).squeeze(1).T
    return out / out.std(0, keepdim=True).clamp_min(1e-6)
