"""Register two scenes: the homography image0 px -> image1 px, coarse to fine, refined to a fraction of a pixel.

    python src/infer.py +pair=demo
    python src/infer.py +pair.image0=PATH +pair.image1=PATH [infer.write_coregistered=true]

Inputs: GeoTIFF, JP2, a .SAFE folder, PNG, JPEG. Outputs in outputs/infer/<pair> (see s2match.inference).
Exit status: 0 success, 1 bad input or configuration, 2 no reliable transform.
"""

from s2match.cli import run
from s2match.inference.run import run_inference

if __name__ == "__main__":
    run(run_inference)
