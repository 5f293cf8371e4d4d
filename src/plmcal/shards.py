"""Per-shard files of a read-out in progress, so that an interrupted extraction resumes.

A shard is the read-out of a few consecutive batches. Each one is a safetensors file in a
``<entry>.shards/`` folder next to the cache entry, with a ``rows`` tensor that names the question
indices it covers. A restart loads the finished shards and computes only the missing rows. After the
merged read-out is saved as the normal cache entry, the folder is removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
ROWS = "rows"  # (n,) int64 question indices of the rows in a shard


class ShardStore:
    """Writes and reads the shard files of one read-out (one model, one cache key)."""

    def __init__(self, folder: str | os.PathLike, key: dict):
        self.folder = Path(folder)
        self.key = json.loads(json.dumps(key, default=str))

    def prepare(self) -> None:
        """Create the folder, or discard it when it belongs to another key (an edited or colliding entry)."""
        key_path = self.folder / KEY_FILE
        if key_path.exists():
            try:
                stored = json.loads(key_path.read_text())
            except json.JSONDecodeError:
                stored = None
            if stored == self.key:
                return
            log.warning("Shard folder %s belongs to another read-out key; discarding its shards.", self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".{KEY_FILE}.{uuid.uuid4().hex}"
        staging.write_text(json.dumps(self.key, indent=1))
        os.replace(staging, key_path)

    def shard_paths(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.safetensors"))

    def write(self, rows: torch.Tensor, tensors: dict[str, torch.Tensor], rank: int = 0) -> Path:
        """Write one shard atomically: a crash mid-write leaves a hidden temporary file, never a shard."""
        name = f"shard-r{rank:03d}-{uuid.uuid4().hex[:12]}.safetensors"
        staging = self.folder / f".{name}.tmp"
        payload = {ROWS: rows.to(torch.long).contiguous()} | {k: v.contiguous() for k, v in tensors.items()}
        save_file(payload, str(staging))
        os.replace(staging, self.folder / name)
        return self.folder / name

    def load(self) -> list[dict[str, torch.Tensor]]:
        """Return the finished shards; a shard that cannot be read is deleted, so its rows are redone."""
        if not self.folder.exists():
            return []
        shards = []
        for path in self.shard_paths():
            try:
                shards.append(load_file(str(path)))
            except (SafetensorError, OSError, RuntimeError) as error:
                log.warning("Shard %s cannot be read (%s); its rows will be computed again.", path, error)
                path.unlink(missing_ok=True)
        return shards

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def finished_rows(shards: list[dict[str, torch.Tensor]]) -> set[int]:
    return {int(i) for shard in shards for i in shard[ROWS]}


def fill_from_shards(out: dict[str, torch.Tensor], shards: list[dict[str, torch.Tensor]]) -> None:
    """Copy every shard's rows into the full (N, ...) tensors of ``out``, or raise on a layout mismatch."""
    for shard in shards:
        rows = shard[ROWS]
        for name, values in shard.items():
            if name == ROWS:
                continue
            if name not in out or out[name].shape[1:] != values.shape[1:]:
                expected = None if name not in out else tuple(out[name].shape[1:])
                raise ValueError(
                    f"shard tensor {name!r} of shape {tuple(values.shape)} does not fit the read-out (expected rows of "
                    f"shape {expected}); delete the .shards folder next to the cache entry to start this read-out again."
                )
            out[name][rows] = values
