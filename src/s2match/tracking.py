"""MLflow for training runs: where runs are stored, the Lightning logger, the registered model, metric curves.

Lightning's MLFlowLogger drops characters MLflow refuses in metric names: `val/auc@3` is stored as `val/auc3`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_ARTIFACT_PATH = "model"


def resolve_tracking_uri(configured: str | None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def build_logger(cfg: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> MLFlowLogger:
    """Lightning logger from the `train.mlflow` config (tracking_uri, artifact_location, experiment)."""
    return MLFlowLogger(
        experiment_name=str(cfg["experiment"]),
        tracking_uri=resolve_tracking_uri(cfg.get("tracking_uri")),
        artifact_location=cfg.get("artifact_location"),
        tags=dict(tags or {}),
        log_model=False,  # checkpoints are logged once at the end, both of them (see log_folder)
    )


def log_folder(logger: MLFlowLogger, folder: str | Path, artifact_path: str) -> None:
    """Every file of `folder` as artifacts of the logger's run under `artifact_path`."""
    if Path(folder).is_dir() and any(Path(folder).iterdir()):
        logger.experiment.log_artifacts(logger.run_id, str(folder), artifact_path)


def register_model(logger: MLFlowLogger, weights: str | Path, config_yaml: str, name: str) -> ModelVersion:
    """Log the exported weights and the run's config under the run's `model/` artifacts and register them as a
    new version of the registered model `name` (created on first use)."""
    client: MlflowClient = logger.experiment
    run_id = logger.run_id
    client.log_artifact(run_id, str(weights), MODEL_ARTIFACT_PATH)
    client.log_text(run_id, config_yaml, f"{MODEL_ARTIFACT_PATH}/config.yaml")
    try:
        client.create_registered_model(name, description="LightGlue matcher head fine-tuned by s2match (src/train.py)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
    return client.create_model_version(name, source, run_id=run_id)


def metric_table(client: MlflowClient, run_id: str, keys: list[str]) -> pd.DataFrame:
    """One row per logged step, one column per metric of `keys` (MLflow names), sorted by step."""
    frames = []
    for key in keys:
        history = client.get_metric_history(run_id, key)
        frames.append(pd.DataFrame({"step": [m.step for m in history], key: [m.value for m in history]})
                      .drop_duplicates("step", keep="last").set_index("step"))
    return pd.concat(frames, axis=1).sort_index().reset_index()
