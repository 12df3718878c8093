"""CPU per image of the transform in a few configurations, on the sample JPEGs.

    python -m pipeline.bench.transform_modes [--repeat 3]

``transform_bytes`` in this process (no pool, no I/O), best of ``--repeat`` passes: re-encoding an
image no op changes against keeping its bytes (``reencode = false``), and the cover and fill modes
to 256x256 (both draft-decoded no smaller than the box they cover).
"""

from __future__ import annotations

import argparse
import sys
import time

from ..config import ExifTranspose, Resize, TransformConfig
from ..transform import transform_bytes
from .demo import SAMPLES

UNCHANGED = (ExifTranspose(), Resize(4096, 4096, enlarge=False))
CONFIGS = {
    "no-op chain, reencode = true": TransformConfig(ops=UNCHANGED),
    "no-op chain, reencode = false": TransformConfig(ops=UNCHANGED, reencode=False),
    "resize cover 256x256": TransformConfig(ops=(ExifTranspose(), Resize(256, 256, "cover"))),
    "resize fill 256x256": TransformConfig(ops=(ExifTranspose(), Resize(256, 256, "fill"))),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench.transform_modes", description=__doc__
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    bodies = [p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg"))]
    for name, config in CONFIGS.items():
        best, kept = float("inf"), 0
        for _ in range(args.repeat):
            started = time.process_time()
            kept = sum(transform_bytes(body, config).data is body for body in bodies)
            best = min(best, time.process_time() - started)
        per = best / len(bodies) * 1000
        sys.stdout.write(f"{name:<32}{len(bodies)} JPEGs: {per:6.2f} ms CPU each, ")
        sys.stdout.write(f"{kept} kept as they came\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
