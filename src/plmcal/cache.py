"""On-disk cache of read-outs, keyed by everything that changes their values.

One entry is a folder ``<cache>/readouts/<model>/<dataset>/<key hash>/`` with ``readout.safetensors``
and ``meta.json``. A read-out in progress keeps its finished shards in ``<key hash>.shards/``. ``meta.json`` stores the full key and the sha256 of the tensor file, so a
truncated or edited file is detected on load instead of feeding wrong numbers to a method.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from plmcal.assets import sha256_file

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)

TENSOR_FILE = "readout.safetensors"
META_FILE = "meta.json"


class CacheCorruptError(RuntimeError):
    """A cache entry exists but cannot be trusted."""


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80]


class ReadoutCache:
    """Stores and loads read-out tensor dictionaries by key."""

    def __init__(self, root: str | os.PathLike, on_corrupt: str = "raise"):
        if on_corrupt not in ("raise", "recompute"):
            raise ValueError(f"cache.on_corrupt={on_corrupt!r} is invalid; use 'raise' or 'recompute'.")
        self.root = Path(root) / "readouts"
        self.on_corrupt = on_corrupt

    def entry_dir(self, key: dict) -> Path:
        return self.root / _slug(str(key.get("model", "model"))) / _slug(str(key.get("dataset", "dataset"))) / key_hash(key)

    def shard_dir(self, key: dict) -> Path:
        """Folder of the per-shard files of a read-out in progress, next to its entry."""
        folder = self.entry_dir(key)
        return folder.with_name(folder.name + ".shards")

    @contextmanager
    def lock(self, key: dict) -> Iterator[None]:
        """Hold an exclusive lock on one entry, so that parallel sweep cells read a model out only once.

        The other processes wait, then find the entry written. ``fcntl.flock`` is POSIX-only.
        """
        if fcntl is None:  # NOTE: no cross-process lock on Windows; parallel cells may read out the same entry twice
            yield
            return
        folder = self.entry_dir(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.with_name(folder.name + ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self, key: dict) -> dict[str, torch.Tensor] | None:
        """Return the cached tensors for ``key``, None on a miss; raise or discard a corrupt entry."""
        folder = self.entry_dir(key)
        tensor_path, meta_path = folder / TENSOR_FILE, folder / META_FILE
        if not meta_path.exists():
            if tensor_path.exists():
                log.warning("Read-out cache entry %s has no %s; recomputing it.", folder, META_FILE)
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != json.loads(json.dumps(key, default=str)):
                raise CacheCorruptError("the stored key differs from the requested key (hash collision or edited meta.json)")
            if not tensor_path.exists():
                raise CacheCorruptError(f"{TENSOR_FILE} is missing")
            actual = sha256_file(tensor_path)
            if actual != meta.get("sha256"):
                raise CacheCorruptError(f"sha256 of {TENSOR_FILE} is {actual}, meta.json records {meta.get('sha256')}")
            tensors = load_file(str(tensor_path))
        except (CacheCorruptError, json.JSONDecodeError, OSError, RuntimeError, ValueError) as error:
            message = f"corrupt read-out cache entry {folder}: {error}."
            if self.on_corrupt == "raise":
                raise CacheCorruptError(
                    f"{message} Delete that folder, or run with cache.on_corrupt=recompute to redo this read-out "
                    "(other entries are kept)."
                ) from error
            log.warning("%s Recomputing it (cache.on_corrupt=recompute).", message)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        log.info("Read-out cache hit: %s", folder)
        return tensors

    def save(self, key: dict, tensors: dict[str, torch.Tensor], extra: dict | None = None) -> Path:
        """Write an entry atomically: a crash mid-write leaves no entry that looks valid."""
        folder = self.entry_dir(key)
        staging = folder.with_name(folder.name + f".partial-{os.getpid()}")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(staging / TENSOR_FILE))
        meta = {
            "key": json.loads(json.dumps(key, default=str)),
            "sha256": sha256_file(staging / TENSOR_FILE),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(extra or {}),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
        log.info("Read-out cached: %s", folder)
        return folder
