"""Read out toy questions of a tiny random Llama with readout.engine=lightning, 2 CPU ranks, strategy ddp.

Run as a script by test_predict.py: Lightning's ddp strategy starts rank 1 by running this script
again, so the script must do the same work on every rank. Rank 0 saves the merged read-out to argv[1].
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers import make_char_tokenizer, make_tiny_model, toy_questions
from plmcal import lens, predict
from plmcal.prompt import PromptSpec, build_prompts
from plmcal.shards import ShardStore

N_ROWS, BATCH, SHARD_BATCHES = 10, 2, 2


def main(output: Path, shard_dir: Path) -> None:
    torch.set_num_threads(1)
    from omegaconf import OmegaConf

    from helpers import CONF_DIR

    prompt = PromptSpec.from_config(OmegaConf.load(CONF_DIR / "prompt" / "daca.yaml"))
    model, tokenizer = make_tiny_model("llama"), make_char_tokenizer()
    rows = toy_questions(N_ROWS)
    option_ids = lens.resolve_option_ids(tokenizer, prompt.option_strings(5), "tiny")
    settings = lens.ReadoutSettings(
        batch_size=BATCH, shard_batches=SHARD_BATCHES, topk=4, engine="lightning", devices=2, strategy="ddp", accelerator="cpu"
    )
    tensors = predict.extract(
        model, tokenizer, build_prompts(tokenizer, rows, prompt), option_ids, [len(r.options) for r in rows], settings,
        shards=ShardStore(shard_dir, {"model": "tiny-llama", "n": N_ROWS}),
    )
    if tensors is not None:
        save_file(tensors, str(output))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
