"""Copy the README's figures from a finished `dvc repro` into docs/ (`make docs`).

The evaluation's error CDF and its best / worst match pictures are copied as they are; the demo run's
pictures are JPEG-encoded as `report.html` embeds them (satellite imagery makes PNGs of megabytes).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from s2match.inference.report import jpeg_bytes  # noqa: E402

COPIED = {"outputs/evaluate/error_cdf.png": "error_cdf.png",
          "outputs/evaluate/matches_worst.png": "matches_worst.png",
          "outputs/evaluate/matches_best.png": "matches_best.png"}
ENCODED = {"outputs/demo/matches.png": "demo_matches.jpg", "outputs/demo/overlay.png": "demo_overlay.jpg"}


def main() -> None:
    missing = [source for source in (*COPIED, *ENCODED) if not (ROOT / source).is_file()]
    if missing:
        sys.exit(f"error: {', '.join(missing)}: not found; run `dvc repro` first")
    for source, name in COPIED.items():
        shutil.copyfile(ROOT / source, ROOT / "docs" / name)
    for source, name in ENCODED.items():
        (ROOT / "docs" / name).write_bytes(jpeg_bytes(ROOT / source))
    print(f"wrote {len(COPIED) + len(ENCODED)} figures to docs/")


if __name__ == "__main__":
    main()
