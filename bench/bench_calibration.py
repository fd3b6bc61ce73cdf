"""Calibration and conformal coverage at a test size where ECE can be read: the inference ablation's confidence
rows on 6000 Earth places x 4 views (test n ~ 900; at the ablation's 3000 places a perfectly calibrated model
already reads ECE 0.057, above the issue's 0.05 target).

Runs ``bench/bench_inference.py`` with ``--locations 6000`` and only the rows about confidence:
``fused4_average`` (ECE before calibration), ``calibrated`` (the default ``top1`` temperature: the ECE of the
answer's confidence, beside ``ece_floor``), ``calibrated_nll``, ``conformal90`` (the fixed split) and
``conformal90_resampled`` (200 by-sequence halvings of val+test). Writes ``bench/results/calibration.json`` in the
inference ablation's format.

    python bench/bench_calibration.py [--locations 6000] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_inference  # noqa: E402

RESULTS = BENCH / "results" / "calibration.json"
VARIANTS = ["fused4_average", "calibrated", "calibrated_nll", "conformal90", "conformal90_resampled"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--locations", type=int, default=6000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    return bench_inference.main(["--locations", str(args.locations), "--seeds", *map(str, args.seeds),
                                 "--variants", *VARIANTS, "--out", str(args.out)])


if __name__ == "__main__":
    main()
