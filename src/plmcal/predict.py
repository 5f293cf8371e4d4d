"""Multi-device read-out through Lightning's predict loop (``readout.engine=lightning``).

Every rank takes every ``world_size``-th batch of the prompts still to do, runs the same per-batch
read-out as ``lens.extract`` (``lens.LensReader``) and writes its own shard files. After the predict
loop, rank 0 (or, with ``ddp_spawn``, the calling process) merges all shards, the finished ones of an
interrupted run included, into the full read-out.

With ``strategy=ddp`` Lightning starts the other ranks by running the same command again, so every
rank runs the calling script up to and through this function. There the non-zero ranks get None and
must stop after their read-outs (``plmcal.run`` does).

NOTE: tested with 2 CPU ranks (gloo) from a plain script. A ddp run started by ``python -m plmcal.run``
(Lightning re-runs the Hydra command per rank) and runs on GPUs were not tried here.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader

from plmcal import lens
from plmcal.shards import ROWS, ShardStore, fill_from_shards, finished_rows

log = logging.getLogger(__name__)


class ReadoutPredictor(L.LightningModule):
    """Wraps a frozen causal LM; ``predict_step`` reads out one batch of prompts."""

    def __init__(self, model: nn.Module, tokenizer: Any, prompts: Sequence[str], batches: list[list[int]], option_ids: Sequence[int],
                 settings: lens.ReadoutSettings, add_special_tokens: bool = True):
        super().__init__()
        self.model = model
        self.tokenizer, self.prompts, self.batches = tokenizer, list(prompts), batches
        self.option_ids, self.settings, self.add_special_tokens = list(option_ids), settings, add_special_tokens
        self.reader: lens.LensReader | None = None

    def predict_dataloader(self) -> DataLoader:
        # Each rank reads every world_size-th batch; the batches are already formed (batch_size=None).
        mine = self.batches[self.global_rank :: self.trainer.world_size]
        return DataLoader(mine, batch_size=None, shuffle=False, collate_fn=lambda batch: batch)

    def on_predict_start(self) -> None:
        self.reader = lens.LensReader(self.model, self.tokenizer, self.option_ids, self.settings, self.add_special_tokens).__enter__()

    def on_predict_end(self) -> None:
        if self.reader is not None:
            self.reader.__exit__(None, None, None)
            self.reader = None

    def predict_step(self, batch: list[int], batch_idx: int) -> dict[str, torch.Tensor]:
        values = self.reader.read_batch([self.prompts[i] for i in batch])
        return {ROWS: torch.tensor(batch, dtype=torch.long)} | values


class ShardWriter(BasePredictionWriter):
    """Writes every ``shard_batches`` predicted batches of this rank as one shard file."""

    def __init__(self, shards: ShardStore, shard_batches: int):
        super().__init__(write_interval="batch")
        self.shards, self.shard_batches = shards, int(shard_batches)
        self.pending: list[dict[str, torch.Tensor]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.pending.append(prediction)
        if len(self.pending) >= self.shard_batches:
            self.flush(trainer.global_rank)

    def on_predict_epoch_end(self, trainer, pl_module):
        self.flush(trainer.global_rank)

    def on_predict_end(self, trainer, pl_module):
        trainer.strategy.barrier("readout-shards-written")  # rank 0 merges only after every rank's last shard

    def flush(self, rank: int) -> None:
        if not self.pending:
            return
        merged = {name: torch.cat([p[name] for p in self.pending]) for name in self.pending[0]}
        self.shards.write(merged.pop(ROWS), merged, rank=rank)
        self.pending = []


def extract(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    option_ids: Sequence[int],
    n_options: Sequence[int],
    settings: lens.ReadoutSettings,
    add_special_tokens: bool = True,
    description: str = "read-out",
    shards: ShardStore | None = None,
) -> dict[str, torch.Tensor] | None:
    """Read out ``prompts`` with ``Trainer.predict`` on ``settings.devices``; same values and layout as ``lens.extract``.

    Returns the merged read-out on rank 0 (and in the caller of ``ddp_spawn``), None on other ranks.
    """
    if shards is None:
        raise ValueError("readout.engine=lightning exchanges the ranks' results through shard files; pass a ShardStore.")
    lengths = lens.token_lengths(tokenizer, prompts, add_special_tokens)
    order = lens.batch_order(lengths, settings)
    shards.prepare()
    done = finished_rows(shards.load())
    todo = [i for i in order if i not in done]
    if done:
        log.info("%s: resuming, %d of %d questions already in %s", description, len(done), len(prompts), shards.folder)
    devices = int(settings.devices)
    if todo:
        predictor = ReadoutPredictor(model, tokenizer, prompts, lens.chunks(todo, int(settings.batch_size)), option_ids, settings, add_special_tokens)
        trainer = L.Trainer(
            accelerator=settings.accelerator,
            devices=devices,
            strategy=settings.strategy if devices > 1 else "auto",
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=True,
            use_distributed_sampler=False,  # predict_dataloader already splits the batches by rank
            callbacks=[ShardWriter(shards, settings.shard_batches)],
        )
        log.info("%s: %d questions on %d %s device(s), strategy %s", description, len(todo), devices, settings.accelerator, trainer.strategy.__class__.__name__)
        with warnings.catch_warnings():
            # The writer needs no batch indices: every prediction carries its question indices.
            warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
            trainer.predict(predictor, return_predictions=False)
        if trainer.global_rank != 0:
            return None

    finished = shards.load()
    out = lens.allocate(len(prompts), len(lens.find_parts(model).layers), len(option_ids), settings)
    fill_from_shards(out, finished)
    missing = sorted(set(range(len(prompts))) - finished_rows(finished))
    if missing:
        raise lens.LensError(
            f"{description}: {len(missing)} questions have no shard after the predict loop (first indices {missing[:5]}) in "
            f"{shards.folder}; a rank failed. Run again: the finished shards are kept and only the missing rows are computed."
        )
    return lens.finalize(out, lengths, option_ids, n_options)
