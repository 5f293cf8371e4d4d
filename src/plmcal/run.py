"""Hydra entry point: ``python -m plmcal.run [overrides]`` runs one calibration job.

A multirun (``-m`` or an experiment that sets ``hydra.mode=MULTIRUN``) runs one job per sweep cell.
The read-out cache lets every cell over the same (model, dataset, prompt) reuse one forward pass.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from plmcal import assets, cape, data, lens, losses, models, pipeline, report
from plmcal.cache import ReadoutCache
from plmcal.module import validate_method
from plmcal.prompt import PromptSpec

log = logging.getLogger(__name__)

# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml share their names with the plugins'
# schemas, so Hydra validates them against those schemas and warns that this matching is deprecated.
# The files set _target_ and every field themselves, so they also work once Hydra drops the matching.
warnings.filterwarnings("ignore", message=".*is validated against ConfigStore schema with the same name.*")

REPO_ROOT = Path(__file__).resolve().parents[2]
OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)
OmegaConf.register_new_resolver("default_cache", lambda: str(assets.cache_root()), replace=True)


class ConfigError(ValueError):
    """A config group choice or value is invalid."""


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten nested config keys with slashes, as W&B's config panel shows them."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat |= flatten(value, name)
        else:
            flat[name] = value
    return flat


def start_wandb(cfg: DictConfig, run_dir: Path) -> Any:
    if not cfg.logger.get("enabled", True):
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.get("entity"),
        mode=cfg.logger.mode,
        dir=str(run_dir),
        group=f"{cfg.pair.name}/{cfg.dataset.name}",
        job_type=cfg.method.name,
        name=f"{cfg.method.name}-{cfg.dataset.name}-{cfg.pair.name}-s{cfg.split.seed}",
        tags=list(cfg.logger.get("tags") or []),
        config=flatten(OmegaConf.to_container(cfg, resolve=True)),
        reinit="finish_previous",
    )


def log_to_wandb(run: Any, result: dict, run_dir: Path, diagnosis_paths: dict[str, Path] | None = None) -> None:
    import wandb

    payload = {f"test/{k}": v for k, v in result["test"].items()}
    payload |= {f"test_uncalibrated/{k}": v for k, v in result["test_uncalibrated"].items()}
    payload |= {f"plm_test/{k}": v for k, v in result["plm_test"].items()}
    payload |= {f"diag/{k}": v for k, v in result["diagnostics"].items()}
    payload["fit/temperature_final"] = result["temperature"]
    images = {"reliability": wandb.Image(str(run_dir / "reliability.png"))}
    if diagnosis_paths:
        from plmcal.diagnosis import scalar_metrics

        summary = json.loads((run_dir / "diagnosis" / "diagnosis.json").read_text())
        payload |= scalar_metrics(summary)
        images |= {f"diagnosis/{name}": wandb.Image(str(path)) for name, path in diagnosis_paths.items()}
    run.log(payload | images)
    for key, value in payload.items():
        run.summary[key] = value


def load_readouts(cfg: DictConfig, prompt: PromptSpec, plm_spec: models.ModelSpec, polm_spec: models.ModelSpec) -> tuple[list, dict[str, pipeline.Readout]]:
    """Load the questions and both models' read-outs, from the cache or by forward passes."""
    cache_dir = cfg.paths.cache_dir
    rows, exemplars, dataset_key = pipeline.prepare_questions(cfg.dataset, prompt, cache_dir)
    option_strings = prompt.option_strings(max(len(row.options) for row in rows))
    tokenizers = {spec.name: models.load_tokenizer(spec, cache_dir) for spec in (plm_spec, polm_spec)}
    option_ids = pipeline.check_option_tokens(tokenizers, option_strings)

    settings = lens.ReadoutSettings(**OmegaConf.to_container(cfg.readout, resolve=True))
    cache = ReadoutCache(cache_dir, on_corrupt=cfg.cache.on_corrupt)
    readouts = {}
    for role, spec in (("plm", plm_spec), ("polm", polm_spec)):
        if settings.dtype != spec.dtype:
            settings = lens.ReadoutSettings(**{**settings.__dict__, "dtype": spec.dtype})
        if settings.engine == "lightning" and spec.device_map is not None:
            raise ConfigError(
                f"readout.engine=lightning places the model itself, but {spec.name} sets device_map={spec.device_map!r}; "
                "use readout.engine=loop for a model split over devices."
            )
        readouts[role] = pipeline.read_out(
            spec, rows, exemplars, prompt, option_ids[spec.name], settings, cache, dataset_key, cache_dir, cfg.device
        )
        if readouts[role] is not None:  # None on the non-zero ranks of a multi-process read-out
            pipeline.check_finite(readouts[role], cfg.dataset.name, rows)

    return rows, readouts


def load_cape_ensemble(cfg: DictConfig, prompt: PromptSpec, polm_spec: models.ModelSpec, method: dict, polm: pipeline.Readout) -> torch.Tensor:
    """(N, K) CAPE probabilities: the PoLM read out once per cyclic option shift (cached per shift), averaged."""
    cache_dir = cfg.paths.cache_dir
    rows, exemplars, dataset_key = pipeline.prepare_questions(cfg.dataset, prompt, cache_dir)
    settings = lens.ReadoutSettings(**OmegaConf.to_container(cfg.readout, resolve=True))
    settings = lens.ReadoutSettings(**{**settings.__dict__, "dtype": polm_spec.dtype})
    cache = ReadoutCache(cache_dir, on_corrupt=cfg.cache.on_corrupt)

    def polm_read_out(shifted_rows: list, key: dict) -> dict:
        readout = pipeline.read_out(polm_spec, shifted_rows, exemplars, prompt, polm.option_ids, settings, cache, key, cache_dir, cfg.device)
        pipeline.check_finite(readout, cfg.dataset.name, shifted_rows)
        return readout.tensors

    n_columns = int(polm.tensors["final_option_logits"].shape[1])
    try:
        shifts = cape.shifts_for(method.get("permutations"), n_columns)
    except cape.CapeError as error:
        raise ConfigError(str(error)) from error
    return cape.ensemble_readouts(rows, shifts, dataset_key, polm_read_out, data.fingerprint)


def run_diagnosis(cfg: DictConfig, readouts: dict[str, pipeline.Readout], labels: torch.Tensor, run_dir: Path) -> dict[str, Path]:
    """Write the drift diagnosis into ``run_dir/diagnosis`` as ``diagnosis.enabled`` (auto, true, false) sets."""
    setting = cfg.get("diagnosis", {}).get("enabled", "auto")
    if setting not in (True, False, "auto"):
        raise ConfigError(f"diagnosis.enabled={setting!r} is invalid; use auto, true or false.")
    if setting is False:
        return {}
    plm, polm = readouts["plm"], readouts["polm"]
    possible = plm.n_layers > 0 and plm.n_layers == polm.n_layers
    if not possible:
        if setting is True:
            raise ConfigError(
                f"diagnosis.enabled=true needs per-layer read-outs of equal depth, got {plm.spec.name} with {plm.n_layers} "
                f"layers and {polm.spec.name} with {polm.n_layers}; set diagnosis.enabled=auto or false for this pair."
            )
        log.info("Drift diagnosis skipped: %s and %s have no per-layer read-outs of equal depth.", plm.spec.name, polm.spec.name)
        return {}
    from plmcal.diagnosis import diagnose, write_diagnosis

    support = cfg.diagnosis.get("support", "options")
    diagnosis = diagnose(plm, polm, labels, support)
    return write_diagnosis(diagnosis, run_dir / "diagnosis", title=f"({cfg.dataset.name})")


def run_job(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Run one (pair, dataset, prompt, method) cell and write its result files into ``run_dir``.

    Returns None on the non-zero ranks of a multi-process read-out, which stop after their shards.
    """
    started = time.perf_counter()
    cache_dir = cfg.paths.cache_dir
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but torch sees no CUDA device; use device=cpu or install a CUDA build of torch.")
    if int(cfg.n_bins) < 1:
        raise ConfigError(f"n_bins={cfg.n_bins!r} is invalid; use a positive number of bins (10 in both papers).")
    prompt = PromptSpec.from_config(cfg.prompt)
    plm_spec = models.ModelSpec.from_config(cfg.pair.plm)
    polm_spec = models.ModelSpec.from_config(cfg.pair.polm)
    method = OmegaConf.to_container(cfg.method, resolve=True)
    try:
        validate_method(method)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    split_cfg = OmegaConf.to_container(cfg.split, resolve=True)
    if not 0.0 < float(split_cfg.get("test_size", 0.7)) < 1.0:
        raise ConfigError(f"split.test_size={split_cfg.get('test_size')!r} is invalid; use a fraction in (0, 1), 0.7 in DACA.")
    if split_cfg.get("by") not in pipeline.SPLIT_BY:
        raise ConfigError(f"split.by={split_cfg.get('by')!r} is invalid; use null (one split) or subject (one split per subject).")
    support = method.get("support", "options")
    if support in ("full_vocab", "topk") and not cfg.readout.full_vocab_lse:
        raise ConfigError(f"method.support={support} needs readout.full_vocab_lse=true.")
    if support == "topk" and not int(cfg.readout.get("topk") or 0):
        raise ConfigError("method.support=topk needs per-layer top-k logits; set readout.topk to a positive k (16 by default).")
    diagnosis_cfg = cfg.get("diagnosis") or {}
    if diagnosis_cfg.get("enabled", "auto") not in (True, False, "auto"):
        raise ConfigError(f"diagnosis.enabled={diagnosis_cfg.get('enabled')!r} is invalid; use auto, true or false.")
    diagnosis_support = diagnosis_cfg.get("support", "options")
    if diagnosis_cfg.get("enabled", "auto") is not False:
        if diagnosis_support not in losses.SUPPORTS:
            raise ConfigError(f"diagnosis.support={diagnosis_support!r} is invalid; use one of {list(losses.SUPPORTS)}.")
        if diagnosis_support == "topk" and not int(cfg.readout.get("topk") or 0):
            raise ConfigError("diagnosis.support=topk needs readout.topk > 0; set readout.topk=16 or diagnosis.support=options.")
        if diagnosis_support != "options" and not cfg.readout.full_vocab_lse:
            raise ConfigError(f"diagnosis.support={diagnosis_support} needs readout.full_vocab_lse=true.")
    if method.get("loss") == "dual_align" and not cfg.readout.lens:
        raise ConfigError("method=dual_align needs readout.lens=true (per-layer read-outs).")

    if method.get("loss") == "dual_align":
        # Checked from the configs so that a mismatch fails before any forward pass.
        pipeline.require_equal_depth(
            method["name"], plm_spec.name, models.num_layers(plm_spec, cache_dir), polm_spec.name, models.num_layers(polm_spec, cache_dir)
        )

    rows, readouts = load_readouts(cfg, prompt, plm_spec, polm_spec)
    if any(readout is None for readout in readouts.values()):
        # A non-zero rank of readout.engine=lightning with strategy=ddp: its shards are written, rank 0 fits.
        log.info("This rank wrote its read-out shards; rank 0 continues the job.")
        return None
    ensemble = load_cape_ensemble(cfg, prompt, polm_spec, method, readouts["polm"]) if method.get("ensemble") == "cape" else None

    labels = torch.tensor([row.gold for row in rows])
    diagnosis_paths = run_diagnosis(cfg, readouts, labels, run_dir)
    wandb_run = start_wandb(cfg, run_dir)
    try:
        logger = False
        if wandb_run is not None:
            from lightning.pytorch.loggers import WandbLogger

            logger = WandbLogger(experiment=wandb_run)
        result = pipeline.run_calibration(
            method, readouts["plm"], readouts["polm"], labels, OmegaConf.to_container(cfg.split), int(cfg.seed), int(cfg.n_bins), logger,
            groups=[row.subject for row in rows],
            ensemble_probs=ensemble,
        )
        result |= {
            "pair": cfg.pair.name,
            "dataset": cfg.dataset.name,
            "prompt": f"{prompt.name}@v{prompt.version}",
            "plm": plm_spec.name,
            "polm": polm_spec.name,
            "n_layers": {"plm": readouts["plm"].n_layers, "polm": readouts["polm"].n_layers},
            "seed": int(cfg.seed),
            "split_seed": int(cfg.split.seed),
            "overrides": _task_overrides(),
            "method_settings": method,
            "wall_seconds": time.perf_counter() - started,
        }
        table = report.write_job(result, run_dir)
        if wandb_run is not None:
            log_to_wandb(wandb_run, result, run_dir, diagnosis_paths)
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)  # marks the W&B run as failed
            wandb_run = None
        raise
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    if _is_multirun():
        log.info("%s on %s: ECE %.2f%% -> %.2f%% (T=%s), results in %s", cfg.method.name, cfg.dataset.name,
                 100 * result["test_uncalibrated"]["ece"], 100 * result["test"]["ece"], result["temperature"], run_dir)
    else:
        print(f"\n{cfg.method.name} on {cfg.dataset.name} ({cfg.pair.name}), results in {run_dir}\n{table}\n", flush=True)
    return result


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(REPO_ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run_job(cfg, run_dir)
    except Exception as error:
        # In a sweep one failing cell must not hide the others: the error goes to this job's log and
        # error.json, the comparison table lists it, and the sweep goes on.
        log.exception("Job failed: %s", error)
        report.write_error(run_dir, error, _task_overrides())
        if not _is_multirun():
            raise
        return float("nan")
    if result is None:
        return float("nan")
    return result["test"]["ece"]  # the value an hparams sweeper would minimise


if __name__ == "__main__":
    # Call main through the importable module: launchers that pickle the task function (joblib,
    # submitit) then pickle a reference to plmcal.run.main, and importing plmcal.run in the worker
    # registers the config resolvers. A function of __main__ would be pickled by value without them.
    from plmcal.run import main as importable_main

    importable_main()
