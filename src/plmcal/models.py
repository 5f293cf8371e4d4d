"""Model specifications from the ``pair`` config and loading of one model at a time."""

from __future__ import annotations

import gc
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plmcal import assets

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Placement strategies of accelerate that transformers' from_pretrained accepts as device_map.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _valid_device_map(value: str) -> bool:
    if value in DEVICE_MAP_STRATEGIES:
        return True
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        return False
    return True


class ModelSpecError(ValueError):
    """A model entry of the pair config is invalid."""


@dataclass(frozen=True)
class ModelSpec:
    """Source and loading settings of one model."""

    name: str
    source: str  # embedded | hub | local
    embedded: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    path: str | None = None
    adapter: str | None = None  # folder of a PEFT adapter merged into the weights after loading
    dtype: str = "float32"
    device_map: str | None = None  # e.g. "auto" for a model larger than one GPU
    trust_remote_code: bool = False
    # num_hidden_layers of the checkpoint. Pinned in the pair config, it lets the equal-depth check of
    # the layer-wise methods run without a download. Null reads it from the model config.
    num_layers: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelSpec":
        spec = cls(**{k: cfg.get(k) for k in cls.__dataclass_fields__ if cfg.get(k) is not None})
        if spec.source not in ("embedded", "hub", "local"):
            raise ModelSpecError(f"model {spec.name!r}: source={spec.source!r} is invalid; use embedded, hub or local.")
        if spec.source == "embedded" and spec.embedded not in assets.GGUF_SOURCES:
            raise ModelSpecError(
                f"model {spec.name!r}: embedded={spec.embedded!r} is unknown; expected one of {sorted(assets.GGUF_SOURCES)}."
            )
        if spec.source == "hub" and not spec.hub_id:
            raise ModelSpecError(f"model {spec.name!r}: source=hub needs `hub_id`.")
        if spec.source == "local" and not (spec.path and Path(spec.path).exists()):
            raise ModelSpecError(f"model {spec.name!r}: local path {spec.path!r} does not exist.")
        if spec.num_layers is not None and (not isinstance(spec.num_layers, int) or spec.num_layers < 1):
            raise ModelSpecError(
                f"model {spec.name!r}: num_layers={spec.num_layers!r} is invalid; use the checkpoint's num_hidden_layers or null."
            )
        if spec.device_map is not None and not _valid_device_map(spec.device_map):
            raise ModelSpecError(
                f"model {spec.name!r}: device_map={spec.device_map!r} is invalid; use one of {list(DEVICE_MAP_STRATEGIES)}, "
                "a device such as 'cuda:0', or null to load onto `device`."
            )
        if spec.dtype not in DTYPES:
            raise ModelSpecError(f"model {spec.name!r}: dtype={spec.dtype!r} is invalid; use one of {sorted(DTYPES)}.")
        if spec.adapter and not (Path(spec.adapter) / "adapter_config.json").exists():
            raise ModelSpecError(
                f"model {spec.name!r}: adapter folder {spec.adapter!r} has no adapter_config.json; "
                "run experiments/post_train.py or fix the path."
            )
        return spec

    def identity(self, cache_dir: str | None = None) -> dict:
        """Return what identifies the weights, for the read-out cache key."""
        if self.source == "embedded":
            ident = {"embedded": self.embedded, "sha256": assets.EMBEDDED_SHA256[self.embedded]}
        elif self.source == "hub":
            # NOTE: an unpinned revision follows the hub's main branch, so a cached read-out can go stale.
            ident = {"hub_id": self.hub_id, "revision": self.revision or "unpinned"}
        else:
            ident = {"path": str(Path(self.path).resolve()), "weights": _folder_fingerprint(Path(self.path))}
        if self.adapter:
            ident["adapter_sha256"] = _folder_fingerprint(Path(self.adapter), pattern="adapter_*")
        return ident


def _folder_fingerprint(folder: Path, pattern: str = "*") -> str:
    """Hash the small files fully and the large ones by name and size (weights of 7B+ models)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob(pattern)):
        if not path.is_file():
            continue
        digest.update(path.name.encode())
        if path.stat().st_size < 64 << 20:
            digest.update(path.read_bytes())
        else:
            digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:20]


def _location(spec: ModelSpec, cache_dir: str | None) -> tuple[str, dict]:
    if spec.source == "embedded":
        return str(assets.converted_model_dir(spec.embedded, cache_dir)), {}
    if spec.source == "hub":
        return spec.hub_id, {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    return spec.path, {"trust_remote_code": spec.trust_remote_code}


def _from_pretrained(factory: Any, spec: ModelSpec, cache_dir: str | None, **extra: Any) -> Any:
    """Call ``factory.from_pretrained`` for the spec, turning a failed download into an actionable error."""
    location, kwargs = _location(spec, cache_dir)
    try:
        return factory.from_pretrained(location, **kwargs, **extra)
    except OSError as error:
        raise ModelSpecError(
            f"loading {factory.__name__} of model {spec.name!r} from {location!r} failed: {error}. For source=hub "
            "the model hub must be reachable (or the model already in the local hub cache); without a network use "
            "source=embedded, or source=local with a downloaded folder."
        ) from error


_TOKENIZERS: dict[str, Any] = {}


def load_tokenizer(spec: ModelSpec, cache_dir: str | None = None) -> Any:
    """Return the spec's tokenizer, parsed once per process.

    A multirun runs its cells in one process, and parsing a large tokenizer (Gemma-3's 262k-token
    tokenizer.json) took most of a cell's time over cached read-outs. The read-out sets left padding and a
    pad token on it (the same values every time); other callers must not modify it.
    """
    from transformers import AutoTokenizer

    key = repr((spec, cache_dir))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _from_pretrained(AutoTokenizer, spec, cache_dir)
    return _TOKENIZERS[key]


def num_layers(spec: ModelSpec, cache_dir: str | None = None) -> int:
    """Return the number of decoder layers: the pinned ``num_layers``, else read from the model config.

    Reading the config of a hub model downloads it (or reads the local hub cache), so pair configs pin
    the value where it is known.
    """
    if spec.num_layers is not None:
        return spec.num_layers
    from transformers import AutoConfig

    return _config_depth(_from_pretrained(AutoConfig, spec, cache_dir))


def _config_depth(config: Any) -> int:
    config = getattr(config, "text_config", None) or config  # multimodal checkpoints (Gemma-3 12B/27B)
    return int(config.num_hidden_layers)


def load(spec: ModelSpec, cache_dir: str | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """Load the model and tokenizer of one spec (weights frozen, eval mode)."""
    from transformers import AutoModelForCausalLM

    log.info("Loading %s (%s, %s)", spec.name, spec.source, spec.dtype)
    tokenizer = load_tokenizer(spec, cache_dir)
    # NOTE: device_map="auto" over several GPUs (accelerate places the layers, the lens follows them to the
    # final norm's device) is checked here only through the kwargs passed to from_pretrained; it was not run
    # on a multi-GPU machine.
    model = _from_pretrained(AutoModelForCausalLM, spec, cache_dir, dtype=DTYPES[spec.dtype], device_map=spec.device_map)
    if spec.adapter:
        from peft import PeftModel

        log.info("Merging adapter %s into %s", spec.adapter, spec.name)
        model = PeftModel.from_pretrained(model, spec.adapter).merge_and_unload()
    if spec.num_layers is not None and _config_depth(model.config) != spec.num_layers:
        raise ModelSpecError(
            f"model {spec.name!r}: the pair config pins num_layers={spec.num_layers}, but the loaded checkpoint has "
            f"{_config_depth(model.config)} layers; fix `num_layers` in the pair config or set it to null."
        )
    if spec.device_map is None:
        model = model.to(device)
    model.eval().requires_grad_(False)
    return model, tokenizer


def release(model: Any) -> None:
    """Drop a model so that the next one never shares memory with it."""
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(model: Any) -> dict:
    config = model.config
    return {
        "architecture": type(model).__name__,
        "num_layers": int(getattr(config, "num_hidden_layers", -1)),
        "vocab_size": int(getattr(config, "vocab_size", -1)),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
