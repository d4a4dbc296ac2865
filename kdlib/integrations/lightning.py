"""PyTorch Lightning: a ``LightningDataModule`` over the cache loader, and the KD ``training_step``.

Shape notation::

    B  sequences per batch (per rank)   T  positions per sequence   V  student vocabulary   K  teacher top-k

* :class:`CacheDataModule` — ``train_dataloader()`` is a :class:`kdlib.CacheLoader` (shard-aware shuffle, rank
  partition from ``torch.distributed``, background reads). Its exact position is the DataModule's state:
  Lightning saves ``state_dict()`` in every checkpoint and calls ``load_state_dict()`` on
  ``trainer.fit(..., ckpt_path=...)``, so a resumed run trains on exactly the batches the uninterrupted run
  would have (no batch repeated or skipped, mid-epoch included). Batches move to the device through
  :func:`kdlib.batch.move_batch` (``input_ids`` widened there, bookkeeping such as ``teacher_vocab_size`` kept on
  the CPU, so the alignment check reads no device memory).
* :class:`DistillModule` — a ``LightningModule`` around a student whose ``training_step`` is
  :func:`kdlib.kd_step_loss`: the student runs on the batch's OWN tokens (no shift possible) and the loss is the
  fused KD (+ CE) with the vocabulary check on. Writing your own ``training_step`` is one line::

      def training_step(self, batch, batch_idx):
          loss, _ = kdlib.kd_step_loss(self.student, batch, ce_weight=0.1, temperature=2.0)
          return loss

Why exact: Lightning fetches a SIZED loader's batches one at a time (no read-ahead of its own), and the cache
loader counts a batch as consumed when it hands it over (its own background thread reads ahead without
moving the position), so at the end of step n the state says "n batches consumed". What Lightning iterates
(:class:`LightningCacheLoader`) reports a FULL epoch's length on this rank, also after a mid-epoch resume:
Lightning restores its batch counter and trains the rest of the epoch, which the loader yields from its
cursor. It also has ``state_dict``/``load_state_dict``, so Lightning's own stateful-loader hooks save the same
position (in the fit loop's state) and do not warn about a non-resumable loader.

``lightning`` is an optional extra (``pip install 'kdcache[lightning]'``); ``kdlib.integrations`` imports this
module only when one of its names is asked for.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import torch

from kdlib.batch import move_batch
from kdlib.integrations.step import kd_step_loss
from kdlib.loader import CacheLoader, RankPlan

__all__ = ["CacheDataModule", "DistillModule", "LightningCacheLoader"]


class LightningCacheLoader:
    """The loader as Lightning iterates it: a full epoch's length, and the loader's exact state.

    Args:
        loader: the :class:`kdlib.CacheLoader` to iterate.
    """

    def __init__(self, loader: CacheLoader) -> None:
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        """Batches of a whole epoch on this rank (from cursor 0), what Lightning counts its progress against."""
        loader = self.loader
        return RankPlan(loader.epoch_length, loader.batch_size, loader.world_size, loader.rank,
                        loader.drop_last).num_batches

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(state)


class CacheDataModule(pl.LightningDataModule):
    """A ``LightningDataModule`` whose training batches come from a teacher-logit cache.

    Args:
        cache: a cache path, URL or open reader (``kdlib.open_cache``).
        batch_size: B, sequences per batch on each rank.
        seed: the shuffle seed (the order is a function of seed and epoch only).
        loader_kwargs: more :class:`kdlib.CacheLoader` arguments (``shuffle``, ``num_workers``, ``drop_last``,
            ``subset``, ``arrays``...). ``device`` is not one: Lightning moves the batches.
        open_kwargs: ``open_cache`` arguments when ``cache`` is a path/URL (e.g. ``decode_dir``).

    Raises:
        ValueError: ``loader_kwargs`` has ``device`` (Lightning places the batches).
    """

    def __init__(self, cache: Any, batch_size: int, *, seed: int = 0, loader_kwargs: Mapping[str, Any] | None = None,
                 open_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.loader_kwargs = dict(loader_kwargs or {})
        if "device" in self.loader_kwargs:
            raise ValueError("CacheDataModule(loader_kwargs={'device': ...}): Lightning moves the batches to the "
                             "module's device itself (through this DataModule's transfer_batch_to_device); drop "
                             "'device'")
        self.cache = cache
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.open_kwargs = dict(open_kwargs or {})
        self._train: CacheLoader | None = None
        self._pending_state: dict[str, Any] | None = None

    def train_dataloader(self) -> LightningCacheLoader:
        """The training loader (made once: later epochs continue it), at the restored position if any."""
        if self._train is None:
            # Made here, not in __init__: under DDP the process group (rank, world size) exists only now.
            self._train = CacheLoader(self.cache, self.batch_size, seed=self.seed, open_kwargs=self.open_kwargs,
                                      **self.loader_kwargs)
        if self._pending_state is not None:
            self._train.load_state_dict(self._pending_state)
            self._pending_state = None
        return LightningCacheLoader(self._train)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, Mapping):
            return move_batch(batch, device)  # bookkeeping stays on the CPU; input_ids widened to int64 there
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        """The training loader's exact position (``kdlib.CacheLoader.state_dict``), saved in every checkpoint."""
        if self._train is not None:
            return {"train_loader": self._train.state_dict()}
        return {"train_loader": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue at a checkpoint's position: now if the loader exists, else when it is made."""
        saved = state_dict.get("train_loader")
        if saved is None:
            return
        if self._train is not None:
            self._train.load_state_dict(saved)
        else:
            self._pending_state = dict(saved)

    def teardown(self, stage: str) -> None:
        if self._train is not None:
            self._train.close()  # stops the background reader; iterating again restarts it


class DistillModule(pl.LightningModule):
    """A student trained by sparse KD from the cache: ``training_step`` = :func:`kdlib.kd_step_loss`.

    Args:
        student: a causal LM (``student(input_ids)`` returns logits [B, T, V], a tuple or a transformers output).
        loss_kwargs: :func:`kdlib.kd_loss_from_batch` options (``ce_weight``, ``temperature``, ``divergence``,
            ``tail``, ``allow_padded_vocab``...). The vocabulary check stays on.
        optimizer: ``parameters -> torch.optim.Optimizer`` (default AdamW with ``lr``).
        lr: learning rate of the default optimizer.
    """

    def __init__(self, student: torch.nn.Module, *, loss_kwargs: Mapping[str, Any] | None = None,
                 optimizer: Callable[[Any], torch.optim.Optimizer] | None = None, lr: float = 1e-3) -> None:
        super().__init__()
        self.student = student
        self.loss_kwargs = dict(loss_kwargs or {})
        self.make_optimizer = optimizer
        self.lr = float(lr)

    def forward(self, input_ids: torch.Tensor) -> Any:
        return self.student(input_ids)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = kd_step_loss(self.student, batch, **self.loss_kwargs)
        self.log("train/kd_loss", loss.detach(), prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.make_optimizer is not None:
            return self.make_optimizer(self.parameters())
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
