"""Copy finished multirun folders into the repository (slim) and aggregate them into one table.

Each job keeps results.json and predictions.npz, which is all that ``plmcal.aggregate`` reads, so
the committed tables can be rebuilt from the committed run folders:

    python experiments/collect_results.py /tmp/abl/terms_a /tmp/abl/terms_b ... --dest experiments/results/ablations
    python -m plmcal.aggregate experiments/results/ablations/runs --out experiments/results/ablations --compare daca:dual_align

The first command also runs the second. Folder names under ``runs/`` are the multirun folders' names.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from plmcal import aggregate

KEPT = ("results.json", "predictions.npz")
COMPARISONS = [("vanilla", "daca"), ("daca", "dual_align"), ("vanilla", "dual_align"), ("match_all", "daca"), ("daca", "dual_align_process_only")]


def copy_slim(run_dir: Path, dest: Path) -> int:
    """Copy the KEPT files of every job under ``run_dir`` into ``dest/<run_dir name>/<job>``; return the job count."""
    count = 0
    for result in sorted(run_dir.rglob("results.json")):
        job = result.parent
        target = dest / run_dir.name / job.relative_to(run_dir)
        target.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            if (job / name).exists():
                shutil.copy2(job / name, target / name)
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="*", type=Path, help="finished multirun folders to copy in")
    parser.add_argument("--dest", type=Path, default=Path("experiments/results/ablations"), help="output folder (runs/ and the tables)")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    for run_dir in args.run_dirs:
        if not run_dir.is_dir():
            parser.error(f"run folder {str(run_dir)!r} not found")
        print(f"{run_dir}: {copy_slim(run_dir, args.dest / 'runs')} jobs copied")
    print(aggregate.aggregate([args.dest / "runs"], args.dest, COMPARISONS, args.resamples))


if __name__ == "__main__":
    main()
