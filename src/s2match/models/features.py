"""Frozen local-feature extractors (SIFT, ALIKED, DISK, XFeat) behind one interface.

Every extractor takes one float image ``(1, C, H, W)`` in ``[0, 1]`` with ``C`` 1 or 3 and returns, for the at most
``max_keypoints`` strongest keypoints (sorted by decreasing score): ``keypoints`` ``(N, 2)`` float32 pixel ``(x, y)``
with ``(0, 0)`` the centre of the top-left pixel (OpenCV convention), ``descriptors`` ``(N, D)``, ``scores`` ``(N,)``
and, for SIFT, ``scales`` and ``oris`` ``(N,)`` (keypoint diameter in pixels and orientation in radians, the inputs
of LightGlue's ``add_scale_ori``).

The networks are frozen: no gradients, and they stay in eval mode when a parent module is put in training mode,
so only the matcher trains. Outside ``torch.inference_mode`` the outputs are ordinary tensors a trained matcher
can consume.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import cv2
import kornia.color
import kornia.feature as KF
import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from s2match.config import CONF_DIR
from s2match.models.weights import load_checkpoint, load_strict, resolve_weights


def _check_image(image: torch.Tensor) -> None:
    if not (
        isinstance(image, torch.Tensor)
        and image.is_floating_point()
        and image.ndim == 4
        and image.shape[0] == 1
        and image.shape[1] in (1, 3)
    ):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected a float image tensor of shape (1, C, H, W) with C in (1, 3), got {shape}")
    if image.numel() and (image.min() < 0 or image.max() > 1):
        raise ValueError(f"expected image values in [0, 1], got [{image.min().item()}, {image.max().item()}]")


def _keep_strongest(found: dict[str, torch.Tensor], max_keypoints: int) -> dict[str, torch.Tensor]:
    """Sort by decreasing score and keep ``max_keypoints``; indexing also turns inference tensors into normal ones."""
    order = torch.argsort(found["scores"], descending=True, stable=True)[:max_keypoints]
    return {key: value[order].float() for key, value in found.items()}


class LocalFeatures(nn.Module, abc.ABC):
    """A frozen detector + descriptor; subclasses implement ``_detect_and_describe`` for one image."""

    name: ClassVar[str]
    descriptor_dim: ClassVar[int]

    def __init__(self, max_keypoints: int) -> None:
        super().__init__()
        if int(max_keypoints) < 1:
            raise ValueError(f"{self.name}: max_keypoints must be >= 1, got {max_keypoints}")
        self.max_keypoints = int(max_keypoints)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()
        # Channels-last convolutions (with the image in that layout too, in `forward`): the same features to float
        # precision, ALIKED about 1.5x faster on CPU.
        self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> LocalFeatures:
        # Frozen: BatchNorm layers must keep their pretrained statistics even when Lightning calls .train().
        return super().train(False)

    @abc.abstractmethod
    def _detect_and_describe(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keypoints, descriptors, scores (and extras) of one image, in any order and count."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_image(image)
        with torch.no_grad():
            found = self._detect_and_describe(image.contiguous(memory_format=torch.channels_last))
        return _keep_strongest(found, self.max_keypoints)


class SiftFeatures(LocalFeatures):
    """OpenCV SIFT with RootSIFT descriptors.

    OpenCV rather than kornia's SIFTFeature: it is the reference DoG implementation LightGlue's SIFT model was
    trained with, it gives real scales and orientations, and on CPU it is several times faster.
    """

    name = "sift"
    descriptor_dim = 128

    def __init__(
        self,
        max_keypoints: int,
        contrast_threshold: float,
        edge_threshold: float,
        rootsift: bool,
    ) -> None:
        super().__init__(max_keypoints)
        self.contrast_threshold = float(contrast_threshold)
        self.edge_threshold = float(edge_threshold)
        self.rootsift = bool(rootsift)
        self._freeze()

    def _detect_and_describe(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        grey = image if image.shape[1] == 1 else kornia.color.rgb_to_grayscale(image)
        grey_u8 = (grey[0, 0] * 255).round().to(torch.uint8).cpu().numpy()
        # Created per call: cv2 objects cannot be pickled or deep-copied with the module, and creation is cheap.
        # nfeatures makes OpenCV describe only the strongest keypoints instead of all of them. Precise upscaling:
        # OpenCV's default doubling of the first octave places every keypoint a quarter pixel off (+0.25, +0.25).
        sift = cv2.SIFT_create(
            nfeatures=self.max_keypoints,
            contrastThreshold=self.contrast_threshold,
            edgeThreshold=self.edge_threshold,
            enable_precise_upscale=True,
        )
        detected, descriptors = sift.detectAndCompute(grey_u8, None)
        if descriptors is None:
            descriptors = np.zeros((0, self.descriptor_dim), np.float32)
        descriptors = torch.from_numpy(descriptors).to(image.device)
        if self.rootsift:
            # RootSIFT (Arandjelovic & Zisserman 2012): Hellinger kernel instead of Euclidean distance.
            descriptors = nn.functional.normalize(descriptors, p=1, dim=-1).sqrt()
        descriptors = nn.functional.normalize(descriptors, p=2, dim=-1)
        columns = np.array([(*k.pt, k.response, k.size, k.angle) for k in detected], np.float32).reshape(-1, 5)
        columns = torch.from_numpy(columns).to(image.device)
        return {
            "keypoints": columns[:, :2],
            "descriptors": descriptors,
            "scores": columns[:, 2],
            "scales": columns[:, 3],
            "oris": torch.deg2rad(columns[:, 4]),
        }


class AlikedFeatures(LocalFeatures):
    """ALIKED-N16 (kornia), the model LightGlue's ``aliked`` weights were trained on."""

    name = "aliked"
    descriptor_dim = 128

    def __init__(
        self,
        max_keypoints: int,
        weights: str | None,
        detection_threshold: float,
        nms_radius: int,
    ) -> None:
        super().__init__(max_keypoints)
        self.net = KF.ALIKED(
            "aliked-n16",
            max_num_keypoints=self.max_keypoints,
            detection_threshold=float(detection_threshold),
            nms_radius=int(nms_radius),
        )
        path = resolve_weights("aliked-n16", weights)
        load_strict(self.net, load_checkpoint(path), path, derived_buffers=("dkd.hw_grid",))
        self._freeze()

    def _detect_and_describe(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        found = self.net(image)[0]
        return {"keypoints": found.keypoints, "descriptors": found.descriptors, "scores": found.keypoint_scores}


class DiskFeatures(LocalFeatures):
    """DISK with the ``depth`` weights (kornia), the model LightGlue's ``disk`` weights were trained on."""

    name = "disk"
    descriptor_dim = 128

    def __init__(
        self,
        max_keypoints: int,
        weights: str | None,
        detection_threshold: float,
        nms_window: int,
    ) -> None:
        super().__init__(max_keypoints)
        self.detection_threshold = float(detection_threshold)
        self.nms_window = int(nms_window)
        self.net = KF.DISK()
        path = resolve_weights("disk", weights)
        checkpoint = load_checkpoint(path)
        # The DISK release nests the network under "extractor" next to training state.
        load_strict(self.net, checkpoint.get("extractor", checkpoint), path)
        self._freeze()

    def _detect_and_describe(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        rgb = image.expand(-1, 3, -1, -1)
        found = self.net(
            rgb,
            n=self.max_keypoints,
            window_size=self.nms_window,
            score_threshold=self.detection_threshold,
            pad_if_not_divisible=True,
        )[0]
        return {"keypoints": found.keypoints, "descriptors": found.descriptors, "scores": found.detection_scores}


class XFeatFeatures(LocalFeatures):
    """XFeat sparse keypoints (kornia), the features LighterGlue was trained on.

    XFeat resizes the image to multiples of 32; keypoints are exact pixels when H and W are multiples of 32.
    """

    name = "xfeat"
    descriptor_dim = 64

    def __init__(
        self, max_keypoints: int, weights: str | None, detection_threshold: float
    ) -> None:
        super().__init__(max_keypoints)
        self.net = KF.XFeat(top_k=self.max_keypoints, detection_threshold=float(detection_threshold))
        path = resolve_weights("xfeat", weights)
        load_strict(self.net.net, load_checkpoint(path), path)
        self._freeze()

    def _detect_and_describe(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        found = self.net.detectAndCompute(image)[0]
        return {"keypoints": found["keypoints"], "descriptors": found["descriptors"], "scores": found["scores"]}


FEATURES: dict[str, type[LocalFeatures]] = {
    cls.name: cls for cls in (SiftFeatures, AlikedFeatures, DiskFeatures, XFeatFeatures)
}


def features_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """conf/features/<name>.yaml (the one home of each extractor's settings) with the other keys of ``cfg``."""
    name = cfg.get("name")
    if name not in FEATURES:
        raise ValueError(f"unknown features {name!r}; known: {', '.join(FEATURES)}")
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "features" / f"{name}.yaml"), resolve=True)
    return {**defaults, **dict(cfg)}


def build_features(cfg: Mapping[str, Any]) -> LocalFeatures:
    """The extractor ``cfg["name"]``, its settings those of conf/features/<name>.yaml overridden by ``cfg``."""
    options = features_config(cfg)
    cls = FEATURES[options.pop("name")]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    if "weights" not in allowed and options.get("weights") is not None:
        raise ValueError(f"features {cls.name!r} have no pretrained weights, but weights={options['weights']!r} was set")
    if "weights" not in allowed:
        options.pop("weights", None)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown options {unknown} for features {cls.name!r}; allowed: {sorted(allowed)}")
    return cls(**options)
