"""The trainers as a PyTorch Lightning module: the fused losses inside an existing trainer.

Optional extra: ``pip install "fusedloss[lightning]"``. The module wraps the same ``Task`` as
``fusedloss.trainers`` (model, data, fused loss, validation metric), so Lightning owns the loop
(devices, precision, accumulation, clipping, checkpoints, loggers) and the fused loss is just
the module's loss::

    import lightning as L
    from fusedloss.trainers.lightning import TrainerModule

    module = TrainerModule("score", steps=200, backend="auto")
    L.Trainer(max_steps=200, gradient_clip_val=1.0).fit(module)

With Lightning's own accumulation, clipping and precision, leave ``accum``, ``clip`` and ``amp``
of the config at their defaults; they are the engine's and are not read here.

Under Lightning's DDP strategies (``strategy="ddp"``, ``"ddp_spawn"``, several devices or nodes)
each rank trains on its rows of the same global batches, and the loss's ``process_group`` is the
world, so every rank's loss is the whole global batch's and the averaged gradient is the
one-process gradient (docs/losses.md §5). Pass ``sync_batchnorm=True`` to the ``Trainer`` for the
score model's BatchNorm on GPUs (on CPUs, ``norm="group"`` has no batch statistics). Under Lightning
the data loader fetches a batch before ``training_step`` runs, so the sequential blendshape
trainer's stride schedule takes effect one batch later than in ``fusedloss.trainers``.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from . import config_for, make_task
from .distributed import rows_of
from .engine import warmup_cosine


class _Batches(IterableDataset):
    """The task's training batches 0..count-1 (CPU tensors; Lightning moves them)."""

    def __init__(self, task, count: int) -> None:
        self.task, self.count = task, count

    def __iter__(self):
        return (self.task.shard(self.task.batch(i, torch.device("cpu"))) for i in range(self.count))


class TrainerModule(L.LightningModule):
    """``TrainerModule(trainer, **options)``: ``trainer`` is "blendshape", "motion" or "score";
    ``options`` are ``fusedloss.trainers.TrainConfig`` fields (steps, batch, backend, lr, ...)."""

    def __init__(self, trainer: str, **options) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = config_for(trainer, **options)
        self.task = make_task(trainer, self.config)
        torch.manual_seed(self.config.seed)
        self.model = self.task.build_model()
        self.loss_fn = self.task.make_loss(self.config.backend)

    def setup(self, stage: str) -> None:
        """Under a DDP strategy: this rank's rows of every batch, and the loss over the whole batch."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world, rank = dist.get_world_size(), dist.get_rank()
            self.task.rows = rows_of(self.config.batch, world, rank)
            self.task.rows_by_rank = [rows_of(self.config.batch, world, r) for r in range(world)]
            self.loss_fn.process_group = dist.group.WORLD

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(self.task, self.config.steps * self.trainer.accumulate_grad_batches),
                          batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=None)   # one placeholder: the task validates on its own data

    def training_step(self, batch, batch_idx):
        scheduled = self.task.schedule(self.global_step, self.loss_fn)
        inputs = self.task.forward(self.model, batch, self.global_step)
        total, terms = self.task.loss(self.loss_fn, inputs)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=self.config.batch)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=self.config.batch)
        if scheduled:
            self.log_dict({f"train/{k}": float(v) for k, v in scheduled.items()}, batch_size=self.config.batch)
        return total

    def validation_step(self, batch, batch_idx):
        values = self.task.validate(self.model, self.device)
        self.log_dict(values, prog_bar=True, batch_size=1)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr,
                                      weight_decay=self.config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.config.warmup, self.config.steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
