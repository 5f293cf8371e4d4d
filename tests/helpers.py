"""Plain helpers shared by the tests: a local character tokenizer, tiny random models built from
configs, toy questions, Hydra composition of conf/, and reference re-implementations of the
official DACA loss and optimisation loop.

Nothing here downloads a model: the tiny models are random and built from their configs.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

from plmcal.data import MCQuestion

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
CROSS_PAIR = "gemma3-270m_smollm2-135m-instruct"  # Gemma-3-270M (18 layers) + SmolLM2-135M-Instruct (30 layers)
SAME_PAIR = "gemma3-270m_sft-dpo"

# Character-level vocabulary: four special tokens, newline, then printable ASCII (100 tokens).
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARACTERS = ["\n"] + [chr(code) for code in range(32, 127)]
TINY_VOCAB = 128  # model vocabulary: the tokenizer never produces the ids past its 100 tokens
TINY_ARCHS = ("llama", "qwen2", "gemma3")
TINY_LAYERS = 3
DEFAULT_THREADS = torch.get_num_threads()  # torch's intra-op thread count before the tests change it


@contextmanager
def torch_threads(count: int):
    """Run the body with ``count`` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_char_tokenizer(lowercase: bool = False):
    """Return a ``transformers`` fast tokenizer with one token per character and a BOS prefix.

    ``lowercase=True`` adds a lowercasing normalizer, so "A" encodes to the token "a": a tokenizer
    whose option letters decode differently from the cased one.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def make_tiny_model(arch: str, seed: int = 0):
    """Build a random 3-layer decoder of the given family from its config (weights frozen, eval mode)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,  # larger than the default, so the option logits differ visibly
    )
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True)
    elif arch == "gemma3":
        # A short sliding window and final soft-capping exercise both Gemma-specific paths.
        config = Gemma3TextConfig(
            **common,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=12,
            final_logit_softcapping=5.0,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def toy_questions(n: int = 6, prefix: str = "toy") -> list[MCQuestion]:
    """Questions of different lengths with 2 to 5 options, so batches need padding and -inf columns."""
    rows = []
    for i in range(n):
        k = 2 + i % 4
        options = tuple(f"option {chr(97 + j)} of question {i}" + " more" * (i % 3) for j in range(k))
        question = f"Question number {i}: which one?" + " Think about it." * i
        rows.append(MCQuestion(f"{prefix}-{i}", question, options, i % k, "toy"))
    return rows


def compose_config(overrides=(), return_hydra_config: bool = False) -> DictConfig:
    """Compose conf/config.yaml with overrides through Hydra's compose API."""
    from hydra import compose, initialize_config_dir

    import plmcal.run  # noqa: F401  (registers the repo_root and default_cache resolvers)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


# --- reference DACA -------------------------------------------------------------------------------
def official_daca_loss(plm: torch.Tensor, polm: torch.Tensor, temperature: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Compute the official DACA loss, written from its description (every question has all K options).

    probs_tuned = softmax(polm / T) and probs_pre = softmax(plm), both clamped to [eps, 1 - eps].
    Rows where the untempered PoLM prediction differs from the PLM prediction contribute 0. The
    cross-entropy -sum probs_pre * log(probs_tuned) is averaged over the whole batch.
    """
    probs_tuned = torch.softmax(polm / temperature, dim=1)
    probs_pre = torch.softmax(plm, dim=1)
    mask = (torch.softmax(polm, dim=1).argmax(dim=1) == probs_pre.argmax(dim=1)).float()
    probs_tuned = torch.clamp(probs_tuned, eps, 1 - eps)
    probs_pre = torch.clamp(probs_pre, eps, 1 - eps)
    per_row = (-probs_pre * torch.log(probs_tuned)).sum(dim=1) * mask
    return per_row.mean()


def official_fit(plm: torch.Tensor, polm: torch.Tensor, seed: int, epochs: int = 400) -> float:
    """Fit T with the official optimisation loop: raw T = 1.0, Adam lr 0.1, shuffled mini-batches of 256.

    The loader is seeded like ``plmcal.module.make_loader`` (a fresh generator seeded with ``seed``).
    """
    temperature = torch.tensor(1.0, requires_grad=True)
    optimizer = torch.optim.Adam([temperature], lr=0.1)
    loader = DataLoader(TensorDataset(plm, polm), batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for plm_batch, polm_batch in loader:
            optimizer.zero_grad()
            loss = official_daca_loss(plm_batch, polm_batch, temperature)
            loss.backward()
            optimizer.step()
    return float(temperature.detach())


def pair_logits(seed: int, n: int = 64, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """PLM logits and overconfident PoLM logits (a scaled, noisy copy) that agree on most rows."""
    generator = torch.Generator().manual_seed(seed)
    plm = torch.randn(n, k, generator=generator) * 1.5
    polm = 3.0 * plm + torch.randn(n, k, generator=generator) * 2.0
    return plm, polm


def with_absent(logits: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Set the columns past each row's option count to -inf, as the read-out does."""
    out = logits.clone()
    for row, count in enumerate(counts):
        out[row, count:] = float("-inf")
    return out


def synthetic_readout(name: str, final: torch.Tensor, layers: int = 4, seed: int = 1) -> "Readout":
    """A cached-read-out stand-in: random lens logits whose last layer equals ``final`` (N, K)."""
    from plmcal import models
    from plmcal.pipeline import Readout

    n, k = final.shape
    lens = torch.randn(n, layers, k, generator=torch.Generator().manual_seed(seed))
    lens[:, -1] = final
    tensors = {
        "final_option_logits": final,
        "final_logsumexp": torch.logsumexp(final, dim=-1) + 1.0,
        "lens_option_logits": lens,
        "lens_logsumexp": torch.logsumexp(lens, dim=-1) + 1.0,
        "greedy_token": torch.zeros(n, dtype=torch.long),
        "greedy_is_option": torch.ones(n, dtype=torch.bool),
        "n_options": torch.full((n,), k),
    }
    return Readout(models.ModelSpec(name=name, source="local", path="."), tensors, list(range(k)))


def synthetic_pair(n: int = 200, k: int = 4, seed: int = 0) -> tuple["Readout", "Readout", torch.Tensor]:
    """(PLM, PoLM, labels): a PLM above chance and a PoLM that is the PLM sharpened 4x plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=generator)
    plm_logits = torch.randn(n, k, generator=generator) + 1.5 * torch.nn.functional.one_hot(labels, k)
    polm_logits = 4.0 * plm_logits + torch.randn(n, k, generator=generator)
    return synthetic_readout("plm", plm_logits), synthetic_readout("polm", polm_logits, seed=2), labels


VANILLA = {"name": "vanilla", "loss": "none", "fit": False}
DACA_LBFGS = {"name": "daca", "loss": "daca", "optimizer": "lbfgs", "lr": 0.5, "epochs": 1, "batch_size": None}


def write_synthetic_sweep(folder: Path, methods: list[dict], seeds: list[int], datasets: tuple[str, ...] = ("toy",), overrides: list[str] = ()) -> int:
    """Write one job folder per (dataset, method, split seed) with the real result writer; return the count."""
    from plmcal import pipeline, report

    count = 0
    for d_index, dataset in enumerate(datasets):
        plm, polm, labels = synthetic_pair(seed=d_index)
        for method in methods:
            for split_seed in seeds:
                result = pipeline.run_calibration(method, plm, polm, labels, {"test_size": 0.7, "seed": split_seed}, seed=0)
                result |= {"pair": "synthetic", "dataset": dataset, "prompt": "toy@v1", "split_seed": split_seed,
                           "n_layers": {"plm": 4, "polm": 4},
                           "overrides": [f"method={method['name']}", f"split.seed={split_seed}", *overrides]}
                report.write_job(result, folder / f"{count}_{dataset}_{method['name']}_s{split_seed}")
                count += 1
    return count
