"""LightGlue run layer by layer, so that every layer's assignment and token confidence can be supervised and scored.

kornia's `LightGlue.forward` returns only the last layer's assignment, and computes the token confidences only
while it prunes (it is trained with depth_confidence = width_confidence = -1). This wrapper repeats its loop with
the same submodules (input_proj, posenc, transformers[i], log_assignment[i], token_confidence[i]) and keeps each
layer's output, so its state dict is exactly kornia's and weights move both ways without renaming.
"""

from __future__ import annotations

import kornia.feature as KF
import torch
from kornia.feature.lightglue import filter_matches, normalize_keypoints
from torch import nn


class LightGlueHead(nn.Module):
    """Trainable LightGlue matcher returning the log assignment and the token-confidence logits of every layer.

    Early stopping and point pruning change the set of points from layer to layer, so the wrapped model must be
    built with depth_confidence=-1 and width_confidence=-1 (as for training in the paper). Descriptors are
    detached: the features are frozen and only the matcher learns.
    """

    def __init__(self, lightglue: KF.LightGlue) -> None:
        super().__init__()
        conf = lightglue.conf
        if conf.depth_confidence > 0 or conf.width_confidence > 0:
            raise ValueError(
                "LightGlueHead: build LightGlue with depth_confidence=-1 and width_confidence=-1 "
                f"(got {conf.depth_confidence}, {conf.width_confidence}); pruning breaks per-layer supervision"
            )
        if conf.add_laf:
            raise ValueError("LightGlueHead: LAF inputs (add_laf, keynet_affnet_hardnet) are not supported")
        self.lightglue = lightglue

    @property
    def n_layers(self) -> int:
        return self.lightglue.conf.n_layers

    def _encode_positions(self, image: dict) -> torch.Tensor:
        """Normalised keypoints (plus scale and orientation for SIFT-like features) -> rotary encoding."""
        conf = self.lightglue.conf
        kpts = normalize_keypoints(image["keypoints"], image["image_size"])
        if kpts.numel() and kpts.abs().max() > 1:
            raise ValueError("LightGlueHead: keypoints outside the image (image_size must be (w, h) in pixels)")
        if conf.add_scale_ori:
            if "scales" not in image or "oris" not in image:
                raise ValueError("LightGlueHead: this LightGlue (add_scale_ori) needs keypoint scales and oris")
            scales = image["scales"] * conf.scale_coef
            kpts = torch.cat([kpts, scales[..., None], image["oris"][..., None]], -1)
        posenc = self.lightglue.posenc
        return posenc(kpts.to(posenc.Wr.weight.dtype))

    def forward(self, data: dict) -> dict:
        """Match two batches of local features.

        Args:
            data: {"image0": {...}, "image1": {...}}, each with keypoints (B, N, 2) px, descriptors (B, N, D),
                image_size (B, 2) as (w, h), and scales and oris (B, N) for add_scale_ori configurations. Pairs of a
                batch need equal keypoint counts (fixed top-k features): kornia's dual-softmax assignment has no
                padding mask, so padded points would take probability mass from real ones.

        Returns:
            log_assignments: list over layers of (B, N+1, M+1) log assignment (last row / column: dustbins);
            confidence_logits: list over every layer but the last of ((B, N), (B, M)) logits of the token
                confidence (the sigmoid of which kornia's early stopping and pruning read), computed, as there, on
                detached descriptors: training them leaves the matcher as it is;
            matches0 (B, N), matches1 (B, M), matching_scores0, matching_scores1 of the last layer, filtered by
            the model's filter_threshold exactly as kornia's LightGlue does (-1: unmatched).
        """
        image0, image1 = data["image0"], data["image1"]
        lightglue = self.lightglue
        encoding0 = self._encode_positions(image0)
        encoding1 = self._encode_positions(image1)
        desc0 = lightglue.input_proj(image0["descriptors"].detach())
        desc1 = lightglue.input_proj(image1["descriptors"].detach())

        log_assignments, confidence_logits = [], []
        for layer, (transformer, assignment) in enumerate(zip(lightglue.transformers, lightglue.log_assignment)):
            desc0, desc1 = transformer(desc0, desc1, encoding0, encoding1)
            log_assignments.append(assignment(desc0, desc1)[0])
            if layer < self.n_layers - 1:  # the last layer has no classifier: it always ends the run
                classifier = lightglue.token_confidence[layer].token[0]  # the linear layer before the sigmoid
                confidence_logits.append((classifier(desc0.detach()).squeeze(-1),
                                          classifier(desc1.detach()).squeeze(-1)))

        matches0, matches1, scores0, scores1 = filter_matches(
            log_assignments[-1].detach(), lightglue.conf.filter_threshold
        )
        return {
            "log_assignments": log_assignments,
            "confidence_logits": confidence_logits,
            "matches0": matches0,
            "matches1": matches1,
            "matching_scores0": scores0,
            "matching_scores1": scores1,
        }

    def early_stop_layer(self, confidence_logits: list[tuple[torch.Tensor, torch.Tensor]], pair: int,
                         depth_confidence: float) -> int:
        """How many layers kornia's LightGlue runs on pair `pair` of the batch with adaptive depth
        `depth_confidence` (-1: off): the first layer where more than that share of the points are confident
        (confidence at least the layer's `confidence_thresholds`, kornia's `check_if_stop`), else all. Without
        point pruning, which can move the stop by changing the points the later layers see."""
        if depth_confidence > 0:
            thresholds = self.lightglue.confidence_thresholds
            for layer, (logits0, logits1) in enumerate(confidence_logits):
                confidences = torch.sigmoid(torch.cat([logits0[pair], logits1[pair]]))
                if 1.0 - (confidences < thresholds[layer]).float().mean() > depth_confidence:
                    return layer + 1
        return self.n_layers
