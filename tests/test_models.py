"""models.load placement: device_map goes to from_pretrained and replaces the move to `device`.

The multi-GPU path itself needs several GPUs, so these tests check only the calls that load makes.
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_model
from plmcal import models


class FakeFactory:
    """Stands in for AutoModelForCausalLM: records the from_pretrained kwargs, returns a tiny model."""

    calls: list[dict] = []
    model: torch.nn.Module | None = None

    @classmethod
    def from_pretrained(cls, location, **kwargs):
        cls.calls.append({"location": location, **kwargs})
        return cls.model


@pytest.fixture()
def loaded(monkeypatch, tiny_model_dir):
    """``loaded(device_map)`` runs models.load on the tiny local model and returns (kwargs, moved_to)."""
    import transformers

    FakeFactory.model = make_tiny_model("llama")
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", FakeFactory)
    moves = []
    original_to = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        moves.append(args[0] if args else kwargs.get("device"))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)

    def _load(device_map):
        FakeFactory.calls = []
        config = {"name": "tiny", "source": "local", "path": str(tiny_model_dir), "dtype": "bfloat16", "device_map": device_map}
        models.load(models.ModelSpec.from_config(config), None, "cpu")
        return FakeFactory.calls[-1], moves

    return _load


def test_device_map_passed(loaded):
    kwargs, _ = loaded("auto")
    assert kwargs["device_map"] == "auto"


def test_device_map_dtype(loaded):
    kwargs, _ = loaded("auto")
    assert kwargs["dtype"] == torch.bfloat16


def test_device_map_no_move(loaded):
    _, moves = loaded("auto")
    assert moves == []


def test_no_device_map_moves(loaded):
    kwargs, moves = loaded(None)
    assert kwargs["device_map"] is None
    assert moves == ["cpu"]


@pytest.mark.parametrize("value", ["auto", "balanced", "sequential", "cuda:1", "cpu"])
def test_device_map_valid(value, tiny_model_dir):
    spec = models.ModelSpec.from_config({"name": "tiny", "source": "local", "path": str(tiny_model_dir), "device_map": value})
    assert spec.device_map == value


def test_device_map_invalid(tiny_model_dir):
    with pytest.raises(models.ModelSpecError, match="device_map='everywhere' is invalid"):
        models.ModelSpec.from_config({"name": "tiny", "source": "local", "path": str(tiny_model_dir), "device_map": "everywhere"})
