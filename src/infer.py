"""Register two scenes: the homography image0 px -> image1 px, coarse to fine, refined to a fraction of a pixel.

    python src/infer.py IMAGE0 IMAGE1 [KEY=VALUE ...]        # any two paths (spaces, brackets, commas, any script)
    python src/infer.py +pair=demo                          # a pair config from conf/pair/
    python src/infer.py +pair.image0=PATH +pair.image1=PATH  # quote a path with special characters: ='my (1).tif'
    python src/infer.py IMAGE0 IMAGE1 infer.write_coregistered=true features=sift matcher=ratio

Inputs: GeoTIFF, JP2, a .SAFE folder, PNG, JPEG. Outputs in infer.output_dir (default outputs/infer/<pair name or
the two stems>-<hash of the two paths>; a folder holding another pair's result is never replaced).
Exit status: 0 success, 1 bad input or configuration, 2 no reliable transform.
"""

from s2match.cli import run
from s2match.inference.run import run_inference

if __name__ == "__main__":
    run(run_inference, __doc__, ("infer",), images=True)
