"""Matchers of two local-feature sets, built from conf/matcher/: LightGlue (trained here or pretrained) and the
mutual nearest neighbour ratio test of the SIFT baseline.

``build_matcher(cfg, feature)`` returns a module whose ``match(feats0, feats1, size0, size1)`` takes two outputs of
``s2match.models.features.LocalFeatures`` and the ``(width, height)`` of each image and returns ``matches`` ``(M, 2)``
int64 indices into the keypoints of image 0 and image 1, their ``scores`` ``(M,)`` (higher is better) and the
number of ``layers`` run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kornia.feature as KF
import torch
from torch import nn

from s2match.models.lightglue import LightGlueMatcher, build_lightglue


class RatioTestMatcher(nn.Module):
    """Mutual nearest neighbours passing Lowe's ratio test both ways (the classic SIFT baseline)."""

    name = "ratio"

    def __init__(self, ratio: float) -> None:
        super().__init__()
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)

    @torch.inference_mode()
    def match(
        self,
        feats0: Mapping[str, torch.Tensor],
        feats1: Mapping[str, torch.Tensor],
        size0: tuple[int, int],
        size1: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """The image sizes are unused; they keep the signature of ``LightGlueMatcher.match``."""
        ratios, matches = KF.match_smnn(feats0["descriptors"], feats1["descriptors"], th=self.ratio)
        # A lower nearest/second-nearest distance ratio is a more distinctive match.
        return {"matches": matches.long(), "scores": 1.0 - ratios[:, 0].float(), "layers": 0}


def build_matcher(cfg: Mapping[str, Any], feature: str) -> LightGlueMatcher | RatioTestMatcher:
    """The matcher ``cfg["name"]`` for features named ``feature``.

    lightglue: ``weights`` (a trained file, ``pretrained`` or ``random``: s2match.models.lightglue.choose_weights)
    and the run-time options of ``lightglue_conf``. ratio: ``ratio``.
    """
    options = dict(cfg)
    name = options.pop("name", None)
    if name == "ratio":
        unknown = sorted(set(options) - {"ratio"})
        if unknown:
            raise ValueError(f"unknown options {unknown} for the ratio matcher; allowed: ['ratio']")
        return RatioTestMatcher(**options)
    if name == "lightglue":
        return LightGlueMatcher(build_lightglue(feature, **options))
    raise ValueError(f"unknown matcher {name!r}; known: lightglue, ratio")
