"""Fine-tune the LightGlue matcher head on cached features, tracked in MLflow (DVC stage `train`).

    python src/train.py [train=smoke|default|long] [key=value ...]     # Hydra overrides of conf/
    python src/train.py train.resume=last                              # go on from the last checkpoint
    python src/train.py trainer.accelerator=gpu trainer.devices=2 trainer.strategy=ddp

Validates the pretrained head once before training, trains, keeps the weights of the best validation (val/auc@3;
the last ones if no validation beat them) and writes under paths.train: matcher.pt (LightGlue state dict for
build_lightglue(weights=...)), metrics.json (val metrics before / after, which step was kept), val_curve.csv (val metrics per step) and checkpoints/ (last.ckpt every train.checkpoint_every steps,
best.ckpt on val/auc@3). The MLflow run gets the flattened config, the curves, the exported head (the full
checkpoints too with mlflow.log_checkpoints=true), and a new version of the registered model mlflow.registered_model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import lightning as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from s2match.cli import run
from s2match.data.datamodule import FeatureDataModule
from s2match.fileio import write_text
from s2match.training.module import MatcherModule
from s2match.tracking import build_logger, log_folder, metric_table, register_model

log = logging.getLogger("train")

MONITOR = "val/auc@3"
# Validation metrics as the module names them, and as MLflow stores them (without '@').
VAL_METRICS = ["val/precision", "val/recall", "val/auc@1", "val/auc@3", "val/auc@5", "val/auc@10", "val/loss"]


def resolve_resume(resume: str | None, checkpoints: Path) -> Path | None:
    """`last` -> checkpoints/last.ckpt; a path -> itself; both must exist."""
    if resume is None:
        return None
    path = checkpoints / "last.ckpt" if str(resume) == "last" else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint to resume from not found (train.resume={resume})")
    return path


class StepTimer(pl.Callback):
    """Wall time per optimisation step of a fit (from its first step, a resumed one included)."""

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.first_step, self.started = trainer.global_step, time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        steps = max(trainer.global_step - self.first_step, 1)
        self.seconds_per_step = (time.perf_counter() - self.started) / steps


def build_trainer(cfg: DictConfig, logger, checkpoints: Path, timer: StepTimer) -> pl.Trainer:
    callbacks = [
        timer,
        # last.ckpt every N steps: a run killed midway loses at most N steps
        ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=int(cfg.train.checkpoint_every), save_last=True,
                        save_top_k=0),
        # best.ckpt after each validation
        ModelCheckpoint(dirpath=checkpoints, filename="best", monitor=MONITOR, mode="max", save_top_k=1,
                        auto_insert_metric_name=False, save_on_train_epoch_end=False),
        LearningRateMonitor(logging_interval="step"),
    ]
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    return pl.Trainer(**options, logger=logger, callbacks=callbacks, default_root_dir=cfg.paths.train,
                      enable_model_summary=False)


def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out = Path(cfg.paths.train)
    checkpoints = out / "checkpoints"
    resume = resolve_resume(cfg.train.resume, checkpoints)
    if resume is None and checkpoints.is_dir():
        shutil.rmtree(checkpoints)  # a fresh run: old checkpoints would be taken for this run's

    datamodule = FeatureDataModule.from_config(cfg)
    module = MatcherModule.from_config(cfg)
    logger = build_logger(cfg.mlflow, cfg.mlflow.experiments.train,
                          tags={"features": str(cfg.features.name), **({"resumed_from": str(resume)} if resume else {})})
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    timer = StepTimer()
    trainer = build_trainer(cfg, logger, checkpoints, timer)

    # the weights a fit starts from are those of the pretrained head (or train.resume's, restored by fit)
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    after = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    kept_step = trainer.global_step
    best = next(c for c in trainer.checkpoint_callbacks if c.monitor == MONITOR)
    if best.best_model_score is not None and float(best.best_model_score) > after[MONITOR]:
        # Few validation pairs and a short schedule: a mid-run validation can beat the last step.
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
        after, kept_step = trainer.validate(module, datamodule=datamodule, verbose=False)[0], state["global_step"]
    if not trainer.is_global_zero:
        return

    weights = module.export_weights(out / "matcher.pt")
    if cfg.mlflow.log_checkpoints:
        log_folder(logger, checkpoints, "checkpoints")
    version = register_model(logger, weights, OmegaConf.to_yaml(cfg, resolve=True), cfg.mlflow.registered_model)
    metrics = {
        "before": {key: before[key] for key in VAL_METRICS},
        "after": {key: after[key] for key in VAL_METRICS},
        "steps": trainer.global_step,
        "kept_step": kept_step,
        "seconds_per_step": timer.seconds_per_step,
        "mlflow_run_id": logger.run_id,
        "registered_model_version": int(version.version),
    }
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    mlflow_names = [key.replace("@", "") for key in VAL_METRICS]
    curve = metric_table(logger.experiment, logger.run_id, mlflow_names)
    write_text(out / "val_curve.csv", curve.to_csv(index=False))
    log.info("val/auc@3 %.2f -> %.2f, val/precision %.3f -> %.3f over %d steps (%.2f s/step); MLflow run %s, "
             "model %s v%s", before[MONITOR], after[MONITOR], before["val/precision"], after["val/precision"],
             trainer.global_step, timer.seconds_per_step, logger.run_id, version.name, version.version)


if __name__ == "__main__":
    run(main, __doc__, ("train",))
