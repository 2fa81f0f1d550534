"""MLflow, the one tracking store of every run (conf/mlflow/): where runs are stored, the Lightning logger of
training, the registered model, metric curves, and the plain runs of evaluation and co-registration.

Lightning's MLFlowLogger drops characters MLflow refuses in metric names: `val/auc@3` is stored as `val/auc3`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_ARTIFACT_PATH = "model"


def resolve_tracking_uri(configured: str | None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def build_logger(cfg: Mapping[str, Any], experiment: str, tags: Mapping[str, str] | None = None) -> MLFlowLogger:
    """Lightning logger of a training run in `experiment`, stored where the `mlflow` group `cfg` says."""
    return MLFlowLogger(
        experiment_name=experiment,
        tracking_uri=resolve_tracking_uri(cfg.get("tracking_uri")),
        artifact_location=cfg.get("artifact_location"),
        tags=dict(tags or {}),
        log_model=False,  # the exported head is logged at the end; full checkpoints only when configured
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


def flat_params(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b': 'value'} (lists indexed), the shape MLflow params take."""
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: str(value)}
    flat: dict[str, str] = {}
    for key, item in items:
        flat.update(flat_params(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def mlflow_metrics(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """'<method>/<kind>/<metric>' with '@' dropped (MLflow refuses it; the training logger does the same)."""
    return {f"{method}/{kind}/{name.replace('@', '')}": value
            for method, kinds in metrics.items() for kind, values in kinds.items() for name, value in values.items()}


def log_run(cfg: Mapping[str, Any], experiment: str, run_name: str, params: Mapping[str, str],
            metrics: Mapping[str, float], tags: Mapping[str, str], folder: Path) -> str:
    """One MLflow run in `experiment` (the `mlflow` group `cfg` says where runs are stored) with params, metrics,
    tags and `folder` as artifacts. Returns the run id."""
    client = MlflowClient(resolve_tracking_uri(cfg.get("tracking_uri")))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=cfg.get("artifact_location"))
        except MlflowException as err:  # created meanwhile by another process
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        experiment_id = found.experiment_id
    run = client.create_run(experiment_id, tags=dict(tags), run_name=run_name)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                         params=[Param(key, value[:MAX_PARAM_VAL_LENGTH]) for key, value in params.items()])
        client.log_artifacts(run_id, str(folder))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id
