"""Every pair config composes into two valid ModelSpecs, pinned depths need no download, and the
layer-wise methods reject pairs of unequal depth before any model is loaded."""

from __future__ import annotations

from functools import lru_cache

import pytest
import transformers
from omegaconf import OmegaConf

from helpers import CONF_DIR, compose_config
from plmcal import models, pipeline
from plmcal.run import run_job

PAIRS = sorted(p.stem for p in (CONF_DIR / "pair").glob("*.yaml"))
HUB_PAIRS = [name for name in PAIRS if OmegaConf.load(CONF_DIR / "pair" / f"{name}.yaml").plm.source == "hub"]
CROSS_HUB_PAIR = "gemma-3-12b-pt_qwen2.5-7b-instruct"


@lru_cache(maxsize=None)  # composing takes about 0.3 s; the tests only read the config
def pair_config(name: str):
    return compose_config([f"pair={name}"]).pair


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("role", ["plm", "polm"])
def test_pair_spec_valid(name, role):
    spec = models.ModelSpec.from_config(pair_config(name)[role])
    assert spec.source in ("embedded", "hub")
    assert spec.num_layers is None or spec.num_layers > 0


@pytest.mark.parametrize("name", HUB_PAIRS)
@pytest.mark.parametrize("role", ["plm", "polm"])
def test_hub_pair_keys(name, role):
    entry = pair_config(name)[role]
    assert entry.hub_id.count("/") == 1
    assert "revision" in entry
    assert entry.dtype == "bfloat16"
    assert entry.device_map == "auto"


def test_pairs_cover_papers():
    polms = {pair_config(name).polm.hub_id for name in HUB_PAIRS}
    expected = {
        "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen2.5-72B-Instruct",
        "Qwen/Qwen2.5-Math-7B-Instruct", "Qwen/Qwen3-8B", "google/gemma-3-12b-it", "google/gemma-3-27b-it",
        "meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-70B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
        "allenai/Llama-3.1-Tulu-3-8B-SFT", "allenai/Llama-3.1-Tulu-3-8B-DPO", "allenai/Llama-3.1-Tulu-3-8B",
        "01-ai/Yi-1.5-34B-Chat", "deepseek-ai/DeepSeek-V2-Lite-Chat",
    }
    assert expected <= polms


def test_pinned_depths_equal():
    # Same-family pairs: where both depths are pinned they must agree, or Dual-Align could never run.
    depths = {name: (pair_config(name).plm.num_layers, pair_config(name).polm.num_layers) for name in HUB_PAIRS}
    both_pinned = {name: pair for name, pair in depths.items() if None not in pair and name != CROSS_HUB_PAIR}
    assert {name: pair for name, pair in both_pinned.items() if pair[0] != pair[1]} == {}
    assert len(both_pinned) >= 5  # qwen2.5-7b/14b/32b, yi-1.5-34b, deepseek-v2-lite


def test_pinned_depth_no_download(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("AutoConfig.from_pretrained was called for a pinned depth")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_download)
    spec = models.ModelSpec.from_config(pair_config("qwen2.5-7b").plm)
    assert models.num_layers(spec) == 28


def test_cross_pair_depth_error(tmp_path):
    # The PLM's depth is given here (it is unpinned in the config), so the check runs without a download.
    cfg = compose_config([f"pair={CROSS_HUB_PAIR}", "pair.plm.num_layers=48", "method=dual_align", "logger=none"])
    with pytest.raises(pipeline.PipelineError, match="equal depth, got gemma-3-12b-pt with 48 layers and Qwen2.5-7B-Instruct with 28"):
        run_job(cfg, tmp_path)


@pytest.mark.parametrize("value", [0, -3, "many"])
def test_num_layers_invalid(value):
    entry = OmegaConf.merge(pair_config("qwen2.5-7b").plm, {"num_layers": value})
    with pytest.raises(models.ModelSpecError, match=f"num_layers={value!r} is invalid"):
        models.ModelSpec.from_config(entry)


def test_pinned_depth_mismatch(tiny_model_dir):
    # The tiny local Llama has 3 layers; a wrong pin is caught when the weights load.
    spec = models.ModelSpec(name="tiny", source="local", path=str(tiny_model_dir), num_layers=5)
    with pytest.raises(models.ModelSpecError, match="pins num_layers=5, but the loaded checkpoint has 3 layers"):
        models.load(spec)
