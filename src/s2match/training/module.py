"""Lightning module that fine-tunes a LightGlue matcher on frozen, cached local features of homography pairs, in
LightGlue's two stages: the matcher, then the token-confidence classifiers of its adaptive depth and width."""

from __future__ import annotations

from pathlib import Path

import lightning as pl
import numpy as np
import torch
from kornia.feature.lightglue import filter_matches
from omegaconf import DictConfig, OmegaConf

from s2match.evaluation.metrics import AUC_THRESHOLDS, auc, match_precision, mean_corner_error
from s2match.models.lightglue import build_lightglue
from s2match.models.weights import save_checkpoint
from s2match.training.groundtruth import match_labels
from s2match.training.layerwise import LightGlueHead
from s2match.training.loss import confidence_loss, deep_supervision_loss
from s2match.twoview.estimators import RobustEstimator

# What a stage trains: `matching` the whole matcher (assignment NLL of every layer), `confidence` only the
# token-confidence classifiers (whether a layer's prediction is already the final one), on the matcher as it is.
STAGES = ("matching", "confidence")


def lightglue_inputs(batch: dict) -> dict:
    """The LightGlue {"image0": ..., "image1": ...} input of a feature-cache batch (keys with suffix 0 / 1)."""
    images = {}
    for side in ("0", "1"):
        image = {
            "keypoints": batch[f"keypoints{side}"],
            "descriptors": batch[f"descriptors{side}"],
            "image_size": batch[f"image_size{side}"],
        }
        for key in ("scales", "oris"):
            if f"{key}{side}" in batch:
                image[key] = batch[f"{key}{side}"]
        images[f"image{side}"] = image
    return images


class MatcherModule(pl.LightningModule):
    """LightGlue head trained in one of two stages (STAGES), as glue-factory trains LightGlue; validated on
    homography estimation.

    `matching`: the deeply supervised assignment NLL; the matches of the last layer are validated. `confidence`:
    the binary cross-entropy of each layer's token confidence against whether that layer's prediction already is
    the last layer's; every other weight is frozen. It is validated as adaptive depth runs: each pair stops at the
    layer kornia's early stopping picks with `depth_confidence` (val/layers) and the matches of that layer are
    scored. Metrics of the confidence stage are logged under `confidence/`.

    Batch: keypoints0 (B, N, 2) px, descriptors0 (B, N, D), image_size0 (B, 2) as (w, h), scales0 / oris0 (B, N)
    for SIFT, the same with suffix 1, H (B, 3, 3) mapping image0 px to image1 px, and pair_id. Pairs of one batch
    must have equal keypoint counts (no padding masks, see LightGlueHead).
    """

    def __init__(
        self,
        feature: str,
        weights: str,
        n_layers: int | None,
        filter_threshold: float,
        depth_confidence: float,
        pos_th: float,
        neg_th: float,
        nll_balancing: float,
        precision_th: float,
        estimator: dict,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        min_lr_ratio: float,
        stage: str = "matching",
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"MatcherModule: unknown stage {stage!r}; known: {', '.join(STAGES)}")
        # not logged: the run logs the whole config, and the two stages' modules would clash on lr and stage
        self.save_hyperparameters(logger=False)
        # point pruning and early stopping change the points between layers, which per-layer labels cannot follow
        depth = {} if n_layers is None else {"n_layers": n_layers}
        lightglue = build_lightglue(feature, weights=weights, filter_threshold=filter_threshold, depth_confidence=-1,
                                    width_confidence=-1, **depth)
        self.head = LightGlueHead(lightglue.train())
        if stage == "confidence":
            self.head.requires_grad_(False)
            lightglue.token_confidence.requires_grad_(True)
        self.prefix = "" if stage == "matching" else "confidence/"
        # validation fits H with the estimator every registration uses
        self.estimator = RobustEstimator.from_config(estimator)
        self._val_records: list[dict] = []

    @classmethod
    def from_config(cls, cfg: DictConfig, stage: str = "matching") -> MatcherModule:
        """Build from a composed config: the LightGlue of the `features` group's extractor with the `model` group's
        settings and the `matcher` group's filter threshold and depth confidence; the `optim` schedule (the
        confidence stage: `train.confidence.lr`, no warmup); the `estimator`."""
        if cfg.matcher.name != "lightglue":
            raise ValueError(f"training fine-tunes a LightGlue: matcher={cfg.matcher.name} has nothing to train")
        model = OmegaConf.to_container(cfg.model, resolve=True)
        optim = OmegaConf.to_container(cfg.optim, resolve=True)
        if stage == "confidence":
            optim.update(lr=float(cfg.train.confidence.lr), warmup_steps=0)
        clash = set(model) & set(optim)
        if clash:
            raise ValueError(f"config groups model and optim both set {sorted(clash)}")
        return cls(feature=str(cfg.features.name), **model, filter_threshold=float(cfg.matcher.filter_threshold),
                   depth_confidence=float(cfg.matcher.depth_confidence), **optim,
                   estimator=OmegaConf.to_container(cfg.estimator, resolve=True), stage=stage)

    def forward(self, batch: dict) -> dict:
        return self.head(lightglue_inputs(batch))

    def _labels(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return match_labels(
            batch["keypoints0"],
            batch["keypoints1"],
            batch["H"],
            batch["image_size0"],
            batch["image_size1"],
            pos_th=self.hparams.pos_th,
            neg_th=self.hparams.neg_th,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        output = self(batch)
        batch_size = batch["keypoints0"].shape[0]
        if self.hparams.stage == "confidence":
            loss = confidence_loss(output["confidence_logits"], output["log_assignments"])
            self.log("confidence/train/loss", loss, prog_bar=True, batch_size=batch_size)
            return loss
        gt_matches0, gt_matches1 = self._labels(batch)
        loss, stats = deep_supervision_loss(output["log_assignments"], gt_matches0, gt_matches1,
                                            self.hparams.nll_balancing)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/loss_last", stats["last"], batch_size=batch_size)
        self.log("train/num_matchable", stats["num_matchable"], batch_size=batch_size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_records = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        output = self(batch)
        gt_matches0, gt_matches1 = self._labels(batch)
        batch_size = batch["keypoints0"].shape[0]
        if self.hparams.stage == "confidence":
            loss = confidence_loss(output["confidence_logits"], output["log_assignments"])
        else:
            loss, _ = deep_supervision_loss(output["log_assignments"], gt_matches0, gt_matches1,
                                            self.hparams.nll_balancing)
        self.log(f"{self.prefix}val/loss", loss, batch_size=batch_size)
        for b in range(batch_size):
            if self.hparams.stage == "confidence":
                layers = self.head.early_stop_layer(output["confidence_logits"], b, self.hparams.depth_confidence)
                matches0 = filter_matches(output["log_assignments"][layers - 1][b: b + 1].detach(),
                                          self.hparams.filter_threshold)[0][0]
            else:
                layers, matches0 = self.head.n_layers, output["matches0"][b]
            self._val_records.append({**self._pair_record(batch, matches0, gt_matches0, b), "layers": layers})

    def _pair_record(self, batch: dict, matches0: torch.Tensor, gt_matches0: torch.Tensor, b: int) -> dict:
        """Precision, recall and homography corner error of the matches `matches0` (N,) of pair b."""
        valid = matches0 > -1
        pts0 = batch["keypoints0"][b][valid].double().cpu().numpy()
        pts1 = batch["keypoints1"][b][matches0[valid]].double().cpu().numpy()
        H_gt = batch["H"][b].double().cpu().numpy()
        precision = match_precision(pts0, pts1, H_gt, threshold=self.hparams.precision_th)
        num_correct = round(precision * len(pts0))
        num_gt = int((gt_matches0[b] >= 0).sum())
        fit = self.estimator.fit(pts0, pts1)
        width, height = (int(v) for v in batch["image_size0"][b].tolist())
        return {
            "precision": precision,
            # a pair without any ground-truth match has no recall to measure
            "recall": num_correct / num_gt if num_gt else float("nan"),
            "corner_error": mean_corner_error(fit.H, H_gt, width, height),
        }

    def on_validation_epoch_end(self) -> None:
        if not self._val_records:
            return
        records = self._val_records
        metrics = {
            "val/precision": float(np.mean([r["precision"] for r in records])),
            "val/recall": float(np.nanmean([r["recall"] for r in records])),
        }
        metrics.update({f"val/{name}": value for name, value in auc([r["corner_error"] for r in records],
                                                                    AUC_THRESHOLDS).items()})
        if self.hparams.stage == "confidence":
            metrics["val/layers"] = float(np.mean([r["layers"] for r in records]))
        self.log_dict({f"{self.prefix}{name}": value for name, value in metrics.items()})
        self._val_records = []

    def configure_optimizers(self) -> dict:
        """AdamW over the weights the stage trains; linear warmup over warmup_steps, then cosine decay to
        lr * min_lr_ratio at the last step."""
        hp = self.hparams
        trained = [parameter for parameter in self.head.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=hp.lr, weight_decay=hp.weight_decay)
        total_steps = self.trainer.estimated_stepping_batches
        if not np.isfinite(total_steps):
            raise ValueError("MatcherModule: set trainer max_steps or max_epochs, the lr schedule needs a length")
        decay_steps = max(int(total_steps) - hp.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, decay_steps, eta_min=hp.lr * hp.min_lr_ratio)
        if hp.warmup_steps > 0:
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / hp.warmup_steps, 1.0, hp.warmup_steps)
            schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, schedule], [hp.warmup_steps])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lightglue_state_dict(self) -> dict[str, torch.Tensor]:
        """The matcher weights with kornia LightGlue's keys, as `build_lightglue(..., weights=path)` loads them."""
        return {key: value.detach().cpu().clone() for key, value in self.head.lightglue.state_dict().items()}

    def export_weights(self, path: str | Path) -> Path:
        """Write `lightglue_state_dict()` to `path` (.pth) atomically."""
        path = Path(path)
        save_checkpoint(self.lightglue_state_dict(), path)
        return path
