"""Measure read-out speed, memory, fit time and sweep time on the embedded pair; write docs/benchmarks.md.

Every speed target is a ratio against a baseline measured in the same run, because other jobs share
the machine. Each extraction variant runs in its own subprocess, so that its peak RSS is its own.

Sections:
  extraction   plmcal.lens.extract vs a one-prompt-per-call loop (batch 1, full logits, no hooks,
               as the official DACA code calls its model) and vs a bare HF forward with the same
               batches (no hooks, logits_to_keep=1); questions/s, tokens/s, peak RSS
  bf16         the read-out in bfloat16 vs float32: speed ratio and ECE difference
  fit          plmcal.module.fit_temperature per method vs the official DACA optimisation loop
               (raw T, Adam lr 0.1, 400 epochs, batch 256, clamped cross-entropy), with the official
               loss of each fitted T
  sweep        a 24-cell multirun (4 methods x 6 datasets) over cached read-outs, end to end

Run (about 15 minutes on 2 CPU cores):
    .venv/bin/python experiments/benchmark.py --questions 96 --sweep-limit 128
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOC = REPO_ROOT / "docs" / "benchmarks.md"
SWEEP_DATASETS = ("sciq", "arc_easy", "arc_challenge", "mmlu_slice", "openbookqa", "commonsense_qa")
SWEEP_METHODS = ("vanilla", "ts_oracle", "daca", "dual_align")
FIT_METHODS = ("vanilla", "ts_oracle", "daca", "daca_faithful", "dual_align")
EXTRACTION_VARIANTS = ("bare", "ours_full", "ours_options", "one_prompt")
PROMPT = "daca_spaced"  # the embedded pair's two models agree on almost no question with the official prompt

log = logging.getLogger("benchmark")


# --- shared set-up --------------------------------------------------------------------------------
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import plmcal.run  # noqa: F401  (registers the config resolvers)

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def bench_questions(n: int, dataset: str = "sciq"):
    """Load the first ``n`` questions of ``dataset`` with the daca_spaced prompt, the model specs and option ids."""
    from plmcal import models, pipeline
    from plmcal.prompt import PromptSpec

    cfg = compose([f"prompt={PROMPT}", f"dataset={dataset}", f"dataset.limit={n}"])
    prompt = PromptSpec.from_config(cfg.prompt)
    specs = {role: models.ModelSpec.from_config(cfg.pair[role]) for role in ("plm", "polm")}
    rows, exemplars, dataset_key = pipeline.prepare_questions(cfg.dataset, prompt, cfg.paths.cache_dir)
    tokenizers = {spec.name: models.load_tokenizer(spec, cfg.paths.cache_dir) for spec in specs.values()}
    option_ids = pipeline.check_option_tokens(tokenizers, prompt.option_strings(max(len(r.options) for r in rows)))
    return cfg, prompt, specs, rows, exemplars, option_ids


def rss_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; the RSS measurement needs Linux.")


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so the peak that follows
    # belongs to the extraction, not to loading the weights.
    Path("/proc/self/clear_refs").write_text("5")


# --- extraction variants (run in a subprocess each) -----------------------------------------------
def one_prompt_loop(model, tokenizer, prompts, option_ids) -> torch.Tensor:
    """Read out one prompt per call with the full logits of every position and no hooks, as the official DACA code calls a model."""
    index = torch.tensor(option_ids)
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt")
            logits = model(**encoded, use_cache=False).logits  # (1, T, V): every position, as a plain call returns
            rows.append(logits[0, -1, index].float())
    return torch.stack(rows)


def bare_forward(model, tokenizer, prompts, option_ids, settings) -> torch.Tensor:
    """Run the read-out's batches (length-sorted, left-padded, explicit positions) with no hooks and logits_to_keep=1."""
    from plmcal import lens

    lengths = lens.token_lengths(tokenizer, prompts, True)
    order = lens.batch_order(lengths, settings)
    tokenizer.padding_side = "left"
    index = torch.tensor(option_ids)
    out = torch.empty(len(prompts), len(option_ids))
    with torch.inference_mode():
        for batch in lens.chunks(order, int(settings.batch_size)):
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True)
            position_ids = (encoded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = model(**encoded, position_ids=position_ids, use_cache=False, logits_to_keep=1).logits[:, -1, :]
            out[torch.tensor(batch)] = logits[:, index].float()
    return out


def worker(args: argparse.Namespace) -> None:
    """Run one extraction variant on one model and print a JSON line with its measurements."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from plmcal import lens, models
    from plmcal.prompt import build_prompts

    cfg, prompt, specs, rows, exemplars, option_ids = bench_questions(args.questions)
    spec = replace(specs[args.model], dtype=args.dtype)
    model, tokenizer = models.load(spec, cfg.paths.cache_dir, "cpu")
    prompts = build_prompts(tokenizer, rows, prompt, exemplars)
    ids = option_ids[spec.name]
    n_options = [len(r.options) for r in rows]
    settings = lens.ReadoutSettings(batch_size=args.batch_size, dtype=args.dtype, full_vocab_lse=args.worker == "ours_full",
                                    topk=16 if args.worker == "ours_full" else 0)
    run = {
        "one_prompt": lambda p: one_prompt_loop(model, tokenizer, p, ids),
        "bare": lambda p: bare_forward(model, tokenizer, p, ids, settings),
        "ours_full": lambda p: lens.extract(model, tokenizer, p, ids, n_options[: len(p)], settings),
        "ours_options": lambda p: lens.extract(model, tokenizer, p, ids, n_options[: len(p)], settings),
    }[args.worker]
    run(prompts[: args.batch_size])  # warm-up: first-call allocations and kernel selection, not timed
    rss_model = rss_kib("VmRSS")
    reset_peak_rss()
    started = time.perf_counter()
    result = run(prompts)
    seconds = time.perf_counter() - started
    tokens = sum(lens.token_lengths(tokenizer, prompts, True))
    if args.save and isinstance(result, dict):
        save_file({k: v.contiguous() for k, v in result.items()}, args.save)
    print(json.dumps({
        "variant": args.worker, "model": spec.name, "dtype": args.dtype, "questions": len(prompts), "seconds": seconds,
        "questions_per_s": len(prompts) / seconds, "tokens_per_s": tokens / seconds,
        "rss_model_mib": rss_model / 1024, "peak_rss_mib": rss_kib("VmHWM") / 1024,
        "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }))


def run_worker(variant: str, args: argparse.Namespace, model: str = "plm", dtype: str = "float32", save: str | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--model", model, "--dtype", dtype,
               "--questions", str(args.questions), "--batch-size", str(args.batch_size)]
    if save:
        command += ["--save", save]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"extraction variant {variant} ({model}, {dtype}) failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    log.info("%s %s %s: %.2f questions/s, peak RSS %.0f MiB", variant, model, dtype, result["questions_per_s"], result["peak_rss_mib"])
    return result


# --- bf16 ECE -------------------------------------------------------------------------------------
def ece_by_dtype(args: argparse.Namespace, scratch: Path) -> dict:
    """PoLM ECE before and after DACA from float32 and from bfloat16 read-outs of the same questions."""
    from safetensors.torch import load_file

    from plmcal import pipeline

    cfg, prompt, specs, rows, exemplars, option_ids = bench_questions(args.questions)
    labels = torch.tensor([row.gold for row in rows])
    method = _method("daca")
    out = {}
    for dtype in ("float32", "bfloat16"):
        readouts = {}
        for role in ("plm", "polm"):
            path = scratch / f"{role}-{dtype}.safetensors"
            out[f"{role}_{dtype}"] = run_worker("ours_full", args, model=role, dtype=dtype, save=str(path))
            readouts[role] = pipeline.Readout(specs[role], load_file(str(path)), option_ids[specs[role].name])
        result = pipeline.run_calibration(method, readouts["plm"], readouts["polm"], labels, {"test_size": 0.7, "seed": 1}, seed=0)
        out[dtype] = {"ece_vanilla": result["test_uncalibrated"]["ece"], "ece_daca": result["test"]["ece"], "temperature": result["temperature"]}
    return out


# --- fit ------------------------------------------------------------------------------------------
def _method(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose([f"method={name}"]).method, resolve=True)


def official_loop(plm: torch.Tensor, polm: torch.Tensor, seed: int) -> float:
    """Fit T with the official DACA optimisation loop in plain torch: raw T = 1, Adam lr 0.1, 400 epochs, batch 256."""
    from torch.utils.data import DataLoader, TensorDataset

    from plmcal import losses

    temperature = torch.tensor(1.0, requires_grad=True)
    optimizer = torch.optim.Adam([temperature], lr=0.1)
    loader = DataLoader(TensorDataset(plm, polm), batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(400):
        for plm_batch, polm_batch in loader:
            optimizer.zero_grad()
            loss = losses.daca_loss_faithful(plm_batch, polm_batch, temperature)
            loss.backward()
            optimizer.step()
    return float(temperature.detach())


def fit_times(dataset: str, limit: int | None, repeats: int) -> dict:
    """Fit seconds and official loss per method, on the cached read-outs of ``dataset``."""
    from plmcal import lens, losses, pipeline
    from plmcal.cache import ReadoutCache

    overrides = [f"prompt={PROMPT}", f"dataset={dataset}"] + ([f"dataset.limit={limit}"] if limit else [])
    cfg, prompt, specs, rows, exemplars, option_ids = _questions_for(overrides)
    from omegaconf import OmegaConf

    settings = lens.ReadoutSettings(**OmegaConf.to_container(cfg.readout, resolve=True))
    cache = ReadoutCache(cfg.paths.cache_dir)
    _, _, dataset_key = pipeline.prepare_questions(cfg.dataset, prompt, cfg.paths.cache_dir)
    readouts = {role: pipeline.read_out(spec, rows, exemplars, prompt, option_ids[spec.name], settings, cache, dataset_key, cfg.paths.cache_dir, "cpu")
                for role, spec in specs.items()}
    labels = torch.tensor([row.gold for row in rows])
    calibration, _ = pipeline.daca_split(len(rows), 0.7, 1)
    calibration = torch.as_tensor(calibration)
    plm_cal = readouts["plm"].tensors["final_option_logits"][calibration]
    polm_cal = readouts["polm"].tensors["final_option_logits"][calibration]

    def official_loss(temperature: float) -> float:
        return float(losses.daca_loss_faithful(plm_cal, polm_cal, torch.tensor(temperature)))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fit_temperature does; the baseline gets the same single thread
    try:
        seconds, temperature = [], None
        for _ in range(repeats):
            started = time.perf_counter()
            temperature = official_loop(plm_cal, polm_cal, seed=0)
            seconds.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    results = {"official_loop": {"seconds": min(seconds), "temperature": temperature, "official_loss": official_loss(temperature)}}
    for name in FIT_METHODS:
        best = None
        for _ in range(repeats):
            result = pipeline.run_calibration(_method(name), readouts["plm"], readouts["polm"], labels, {"test_size": 0.7, "seed": 1}, seed=0)
            if best is None or result["fit"]["seconds"] < best["fit"]["seconds"]:
                best = result
        results[name] = {"seconds": best["fit"]["seconds"], "temperature": best["temperature"], "official_loss": official_loss(best["temperature"])}
    results["n_calibration"] = len(calibration)
    return results


def _questions_for(overrides: list[str]):
    from plmcal import models, pipeline
    from plmcal.prompt import PromptSpec

    cfg = compose(overrides)
    prompt = PromptSpec.from_config(cfg.prompt)
    specs = {role: models.ModelSpec.from_config(cfg.pair[role]) for role in ("plm", "polm")}
    rows, exemplars, _ = pipeline.prepare_questions(cfg.dataset, prompt, cfg.paths.cache_dir)
    tokenizers = {spec.name: models.load_tokenizer(spec, cfg.paths.cache_dir) for spec in specs.values()}
    option_ids = pipeline.check_option_tokens(tokenizers, prompt.option_strings(max(len(r.options) for r in rows)))
    return cfg, prompt, specs, rows, exemplars, option_ids


# --- sweep ----------------------------------------------------------------------------------------
def sweep_command(limit: int | None, launcher: str, output_dir: Path, methods=SWEEP_METHODS) -> list[str]:
    command = [sys.executable, "-m", "plmcal.run", "-m", f"prompt={PROMPT}", f"dataset={','.join(SWEEP_DATASETS)}",
               f"method={','.join(methods)}", "logger=none", f"paths.output_dir={output_dir}"]
    if limit:
        command.append(f"dataset.limit={limit}")
    if launcher != "basic":
        command.append(f"hydra/launcher={launcher}")
    return command


def timed_sweep(limit: int | None, launcher: str, output_dir: Path, methods=SWEEP_METHODS) -> dict:
    command = sweep_command(limit, launcher, output_dir, methods)
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"sweep failed ({' '.join(command)}):\n{completed.stderr[-3000:]}")
    sweep_dirs = sorted(output_dir.glob("multiruns/*"))
    cells = len(list(sweep_dirs[-1].glob("*/results.json"))) if sweep_dirs else 0
    failed = len(list(sweep_dirs[-1].glob("*/error.json"))) if sweep_dirs else 0
    shown = ["python"] + [part for part in command[1:] if not part.startswith("paths.output_dir=")]
    return {"seconds": seconds, "cells": cells, "failed": failed, "command": " ".join(shown)}


# --- report ---------------------------------------------------------------------------------------
def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return {
        "cpu": fields.get("Model name", "?").strip(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "load_average": os.getloadavg(),
    }


def write_doc(path: Path, report: dict, command: str) -> None:
    m, ex, fit, sweep, bf16 = report["machine"], report["extraction"], report["fit"], report["sweep"], report["bf16"]
    one, bare, full, options = ex["one_prompt"], ex["bare"], ex["ours_full"], ex["ours_options"]
    official = fit["official_loop"]
    targets = [
        ("extraction vs one-prompt loop", full["questions_per_s"] / one["questions_per_s"], ">= 2.5x", full["questions_per_s"] / one["questions_per_s"] >= 2.5),
        ("read-out overhead vs bare forward (full-vocab LSE + top-16 on)", full["seconds"] / bare["seconds"] - 1, "<= 10 %", full["seconds"] / bare["seconds"] <= 1.10),
        ("read-out overhead vs bare forward (option rows only)", options["seconds"] / bare["seconds"] - 1, "<= 10 %", options["seconds"] / bare["seconds"] <= 1.10),
        ("peak RSS / RSS of the loaded model", full["peak_rss_mib"] / full["rss_model_mib"], "<= 1.3x", full["peak_rss_mib"] / full["rss_model_mib"] <= 1.3),
        ("DACA fit time / official loop time", fit["daca"]["seconds"] / official["seconds"], "<= 1/20 (0.05)",
         fit["daca"]["seconds"] / official["seconds"] <= 0.05 and fit["daca"]["official_loss"] <= official["official_loss"] + 1e-6),
        ("24-cell sweep over cached read-outs (s)", sweep["basic"]["seconds"], "< 120 s", sweep["basic"]["seconds"] < 120 and sweep["basic"]["cells"] == 24),
        ("bf16 ECE difference (points, DACA test ECE)", 100 * abs(bf16["bfloat16"]["ece_daca"] - bf16["float32"]["ece_daca"]), "< 0.2", 100 * abs(bf16["bfloat16"]["ece_daca"] - bf16["float32"]["ece_daca"]) < 0.2),
    ]
    lines = [
        "# Benchmarks",
        "",
        "Speed, memory and fit-time ratios of the read-out and the calibration, each measured against a",
        "baseline in the same run (other jobs share the machine, so absolute times are noisy).",
        "Written by `experiments/benchmark.py`; rerun it to refresh this page.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} intra-op threads), Python {m['python']};"
        f" load average at the start {m['load_average'][0]:.1f} (other jobs were running)",
        f"- Date: {report['date']}",
        f"- Questions: the first {report['questions']} SciQ questions, prompt `{PROMPT}`, batch size {report['batch_size']}; "
        f"extraction on the PLM (Gemma-3-270M; the PoLM has the same architecture). Each variant runs in its own subprocess "
        f"after one warm-up batch; the variants run in {report['repeats']} interleaved rounds and the table keeps each one's fastest run.",
        "",
        "## Targets",
        "",
        "| measure | value | target | met |",
        "|---|---|---|---|",
    ]
    for name, value, target, met in targets:
        shown = f"{100 * value:.1f} %" if "overhead" in name else f"{value:.3g}"
        lines.append(f"| {name} | {shown} | {target} | {'yes' if met else '**no**'} |")
    lines += [
        "",
        "## Extraction",
        "",
        "| variant | questions/s | tokens/s | time ratio to bare forward | speed-up over one-prompt loop | RSS after load (MiB) | peak RSS during extraction (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "one_prompt": "one prompt per call, full logits, no hooks (as the official DACA code)",
        "bare": "bare HF forward, same batches, logits_to_keep=1, no hooks",
        "ours_full": "`lens.extract`, default read-out (lens + full-vocabulary LSE + top-16)",
        "ours_options": "`lens.extract`, `readout.full_vocab_lse=false readout.topk=0` (option rows only)",
    }
    for key, label in labels.items():
        r = ex[key]
        lines.append(f"| {label} | {r['questions_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['seconds'] / bare['seconds']:.3f} | "
                     f"{r['questions_per_s'] / one['questions_per_s']:.2f}x | {r['rss_model_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
    lines += [
        "",
        f"Weights in memory: {full['weights_mib']:.0f} MiB (float32). RSS after load includes Python, torch and the tokenizer.",
        "",
        "## bfloat16 read-out",
        "",
        "| dtype | PLM questions/s | PoLM questions/s | PoLM ECE before (%) | PoLM ECE after DACA (%) | T |",
        "|---|---|---|---|---|---|",
    ]
    for dtype in ("float32", "bfloat16"):
        lines.append(f"| {dtype} | {bf16[f'plm_{dtype}']['questions_per_s']:.2f} | {bf16[f'polm_{dtype}']['questions_per_s']:.2f} | "
                     f"{100 * bf16[dtype]['ece_vanilla']:.2f} | {100 * bf16[dtype]['ece_daca']:.2f} | {bf16[dtype]['temperature']:.3f} |")
    speed = bf16["plm_bfloat16"]["questions_per_s"] / bf16["plm_float32"]["questions_per_s"]
    lines += [
        "",
        f"Speed ratio bf16 / fp32 (PLM): {speed:.2f}x. ECE difference: {100 * abs(bf16['bfloat16']['ece_vanilla'] - bf16['float32']['ece_vanilla']):.2f} "
        f"points before and {100 * abs(bf16['bfloat16']['ece_daca'] - bf16['float32']['ece_daca']):.2f} points after DACA "
        f"(DACA split of the {report['questions']} questions, so the test part has {report['questions'] - int(0.3 * report['questions'])} or so).",
        "",
        "## Fit",
        "",
        f"On the cached read-outs of {fit['dataset']} ({fit['n_calibration']} calibration questions). The official loop: T = 1 learned",
        "directly, Adam lr 0.1, 400 epochs, shuffled batches of 256 from a `DataLoader`, the clamped cross-entropy",
        "(`losses.daca_loss_faithful`), one thread. The official loss column evaluates that loss at each fitted T on the",
        "whole calibration split (lower is better for the DACA objective; ts_oracle and dual_align minimise other losses).",
        "",
        "| method | fit seconds | ratio to official loop | T | official DACA loss |",
        "|---|---|---|---|---|",
    ]
    for name in ("official_loop", *FIT_METHODS):
        r = fit[name]
        lines.append(f"| {name} | {r['seconds']:.3f} | {r['seconds'] / official['seconds']:.3f} | {r['temperature']:.4f} | {r['official_loss']:.6f} |")
    lines += [
        "",
        "## Sweep",
        "",
        "| launcher | cells | failed | seconds | command |",
        "|---|---|---|---|---|",
    ]
    for launcher, r in sweep.items():
        lines.append(f"| {launcher} | {r['cells']} | {r['failed']} | {r['seconds']:.1f} | `{r['command']}` |")
    lines += ["", "The read-outs were cached before the timed runs (the warm-up run is not timed)."]
    notes = report.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=96, help="SciQ questions of the extraction and bf16 runs")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per forward pass of the batched variants")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the extraction variants, and runs per fit; the fastest of each is kept")
    parser.add_argument("--sweep-limit", type=int, default=None, help="questions per dataset in the sweep (dataset.limit); default all")
    parser.add_argument("--fit-dataset", default="sciq", help="dataset whose cached read-outs the fit timings use")
    parser.add_argument("--launchers", default="basic,joblib", help="comma-separated Hydra launchers to time the sweep with")
    parser.add_argument("--output", type=Path, default=DEFAULT_DOC, help="markdown file to write")
    parser.add_argument("--worker", choices=("one_prompt", "bare", "ours_full", "ours_options"), help=argparse.SUPPRESS)
    parser.add_argument("--model", default="plm", choices=("plm", "polm"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.questions < args.batch_size:
        parser.error(f"--questions={args.questions} is below --batch-size={args.batch_size}; use at least one full batch.")
    if args.worker:
        logging.basicConfig(level=logging.WARNING)
        worker(args)
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    command = "python experiments/benchmark.py " + " ".join(sys.argv[1:])
    report: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "questions": args.questions,
                              "batch_size": args.batch_size, "repeats": args.repeats}
    scratch = REPO_ROOT / "outputs" / "benchmark"
    scratch.mkdir(parents=True, exist_ok=True)

    log.info("Extraction variants")
    # Interleaved rounds, so that a burst of load from other jobs hits every variant alike.
    rounds = [{variant: run_worker(variant, args) for variant in EXTRACTION_VARIANTS} for _ in range(args.repeats)]
    report["extraction"] = {variant: min((r[variant] for r in rounds), key=lambda r: r["seconds"]) for variant in EXTRACTION_VARIANTS}
    log.info("bf16 vs fp32")
    report["bf16"] = ece_by_dtype(args, scratch)

    log.info("Sweep warm-up: read out every (model, dataset) that is not cached yet")
    warm = timed_sweep(args.sweep_limit, "basic", scratch / "sweep-warmup", methods=("vanilla",))
    log.info("Warm-up done in %.0f s", warm["seconds"])
    log.info("Fit timings")
    report["fit"] = fit_times(args.fit_dataset, args.sweep_limit, args.repeats) | {"dataset": args.fit_dataset}
    report["sweep"] = {}
    for launcher in args.launchers.split(","):
        log.info("Sweep with the %s launcher", launcher)
        report["sweep"][launcher] = timed_sweep(args.sweep_limit, launcher, scratch / f"sweep-{launcher}")
    (scratch / "report.json").write_text(json.dumps(report, indent=1))
    write_doc(args.output, report, command)
    log.info("Wrote %s", args.output)


if __name__ == "__main__":
    main()
