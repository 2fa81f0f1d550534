"""Fine-tune the LightGlue matcher head on cached features, tracked in MLflow (DVC stages `train`, `train_fast`).

    python src/train.py [train=smoke|default|long] [key=value ...]     # Hydra overrides of conf/
    python src/train.py preset=fast                                    # the fast preset's matcher (conf/presets/)
    python src/train.py train.resume=last                              # go on from the last checkpoint
    python src/train.py device=cuda trainer.devices=2 trainer.strategy=ddp

Two stages, as glue-factory trains LightGlue. The matcher: validates the pretrained head once, trains, keeps the
weights of the best validation (val/auc@3; the last ones if no validation beat them). Then its token-confidence
classifiers alone (train.confidence), on the kept matcher: they are what adaptive depth and width read, and the
release's are stale for a fine-tuned head. Writes under paths.train: matcher.pt (one LightGlue state dict, with the
trained confidence heads, for build_lightglue(weights=...)), metrics.json (val metrics before / after each stage,
which step was kept, seconds per step), val_curve.csv (val metrics per step of the first stage) and checkpoints/
(first stage: last.ckpt every train.checkpoint_every steps, best.ckpt on val/auc@3). The MLflow run gets the
flattened config, the curves of both stages (the second under confidence/), the exported head (the full
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
from s2match.presets import with_preset
from s2match.training.module import MatcherModule
from s2match.tracking import build_logger, log_folder, metric_table, register_model
from s2match.twoview.pipeline import resolve_device

log = logging.getLogger("train")

MONITOR = "val/auc@3"
# Validation metrics as the module names them, and as MLflow stores them (without '@').
VAL_METRICS = ["val/precision", "val/recall", "val/auc@1", "val/auc@3", "val/auc@5", "val/auc@10", "val/loss"]
# The confidence stage's, logged under confidence/: the layers adaptive depth runs and the matches of that layer.
CONFIDENCE_METRICS = ["val/layers", *VAL_METRICS]


def resolve_resume(resume: str | None, checkpoints: Path) -> Path | None:
    """`last` -> checkpoints/last.ckpt; a path -> itself; both must exist."""
    if resume is None:
        return None
    path = checkpoints / "last.ckpt" if str(resume) == "last" else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint to resume from not found (train.resume={resume})")
    return path


class StepTimer(pl.Callback):
    """Wall time per optimisation step of a fit (from its first step, a resumed one included); None without steps
    (trainer.max_steps=0: the matcher as model.weights loads it, only its confidence heads trained)."""

    seconds_per_step: float | None = None

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.first_step, self.started = trainer.global_step, time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        steps = max(trainer.global_step - self.first_step, 1)
        self.seconds_per_step = (time.perf_counter() - self.started) / steps


def build_trainer(cfg: DictConfig, logger, callbacks: list[pl.Callback], **options) -> pl.Trainer:
    """A Lightning Trainer with the `trainer` options (and `options` over them) on the project's `device`."""
    options = {**OmegaConf.to_container(cfg.trainer, resolve=True), **options}
    return pl.Trainer(**options, accelerator=resolve_device(str(cfg.device)).type, logger=logger,
                      callbacks=callbacks, default_root_dir=cfg.paths.train, enable_model_summary=False)


def train_matcher(cfg: DictConfig, datamodule: FeatureDataModule, logger, checkpoints: Path, resume: Path | None
                  ) -> tuple[MatcherModule, dict]:
    """The first stage: the matcher, the weights of the best validation kept. Returns the module and metrics."""
    module = MatcherModule.from_config(cfg)
    timer = StepTimer()
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
    trainer = build_trainer(cfg, logger, callbacks)
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
    return module, {"before": {key: before[key] for key in VAL_METRICS},
                    "after": {key: after[key] for key in VAL_METRICS},
                    "steps": trainer.global_step, "kept_step": kept_step, "seconds_per_step": timer.seconds_per_step}


def train_confidence(cfg: DictConfig, matcher: MatcherModule, datamodule: FeatureDataModule, logger
                     ) -> tuple[MatcherModule, dict]:
    """The second stage: the token-confidence classifiers of `matcher`, everything else frozen; short, so neither
    checkpointed nor resumed. Returns the module and metrics (before: the classifiers the matcher came with)."""
    module = MatcherModule.from_config(cfg, stage="confidence")
    module.head.load_state_dict(matcher.head.state_dict())
    timer = StepTimer()
    stage = cfg.train.confidence
    trainer = build_trainer(cfg, logger, [timer], max_steps=int(stage.max_steps),
                            val_check_interval=int(stage.val_check_interval), enable_checkpointing=False)
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    trainer.fit(module, datamodule=datamodule)
    after = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    keys = {key: f"confidence/{key}" for key in CONFIDENCE_METRICS}
    return module, {"before": {key: before[name] for key, name in keys.items()},
                    "after": {key: after[name] for key, name in keys.items()},
                    "steps": trainer.global_step, "seconds_per_step": timer.seconds_per_step}


def per_step(stage: dict) -> str:
    seconds = stage["seconds_per_step"]
    return "-" if seconds is None else f"{seconds:.2f}"


def main(cfg: DictConfig) -> None:
    cfg = with_preset(cfg)
    resolve_device(str(cfg.device))  # device=cuda without a GPU: say so before any work
    torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out = Path(cfg.paths.train)
    checkpoints = out / "checkpoints"
    resume = resolve_resume(cfg.train.resume, checkpoints)
    if resume is None and checkpoints.is_dir():
        shutil.rmtree(checkpoints)  # a fresh run: old checkpoints would be taken for this run's

    datamodule = FeatureDataModule.from_config(cfg)
    logger = build_logger(cfg.mlflow, cfg.mlflow.experiments.train,
                          tags={"features": str(cfg.features.name), "preset": str(cfg.preset),
                                **({"resumed_from": str(resume)} if resume else {})})
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    matcher, matching = train_matcher(cfg, datamodule, logger, checkpoints, resume)
    module, confidence = train_confidence(cfg, matcher, datamodule, logger)
    if not module.trainer.is_global_zero:
        return

    weights = module.export_weights(out / "matcher.pt")
    if cfg.mlflow.log_checkpoints:
        log_folder(logger, checkpoints, "checkpoints")
    version = register_model(logger, weights, OmegaConf.to_yaml(cfg, resolve=True), cfg.mlflow.registered_model)
    metrics = {**matching, "confidence": confidence, "mlflow_run_id": logger.run_id,
               "registered_model_version": int(version.version)}
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    mlflow_names = [key.replace("@", "") for key in VAL_METRICS]
    curve = metric_table(logger.experiment, logger.run_id, mlflow_names)
    write_text(out / "val_curve.csv", curve.to_csv(index=False))
    before, after = matching["before"], matching["after"]
    log.info("val/auc@3 %.2f -> %.2f, val/precision %.3f -> %.3f over %d steps (%s s/step); confidence heads: "
             "%.2f -> %.2f layers run, adaptive val/auc@3 %.2f -> %.2f over %d steps (%s s/step); MLflow run %s, "
             "model %s v%s", before[MONITOR], after[MONITOR], before["val/precision"], after["val/precision"],
             matching["steps"], per_step(matching), confidence["before"]["val/layers"],
             confidence["after"]["val/layers"], confidence["before"][MONITOR], confidence["after"][MONITOR],
             confidence["steps"], per_step(confidence), logger.run_id, version.name, version.version)


if __name__ == "__main__":
    run(main, __doc__, ("train",))
