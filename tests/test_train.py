"""src/train.py end to end on tiny real pairs (train=smoke): both stages (matcher, confidence heads), MLflow
tracking and registry, a resume after a kill, determinism under the seed, the fast preset, and the features + train
DVC stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from s2match.config import PIPELINE_CONFIG, PROJECT_ROOT, compose_config, render_params
from s2match.data.featurecache import write_cache
from s2match.models.lightglue import build_lightglue
from s2match.tracking import DEFAULT_TRACKING_URI, resolve_tracking_uri
from test_featurecache import write_tiny_pairs

TINY_SPLITS = {"train": 2, "val": 1}
PROJECT_FILES = ["conf", "pipeline", "src", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"]


def command(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def environment(tracking_db: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tracking_db}"}


def losses(client: MlflowClient, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == DEFAULT_TRACKING_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None) == "sqlite:///env.db"
    assert resolve_tracking_uri("sqlite:///cfg.db") == "sqlite:///cfg.db"


@pytest.fixture(scope="module")
def killed_run(sample_dir, tmp_path_factory) -> dict:
    """Smoke training started for many steps, killed (SIGKILL) as soon as a checkpoint past step 2 exists."""
    work = tmp_path_factory.mktemp("train")
    pairs_dir = write_tiny_pairs(sample_dir, work, TINY_SPLITS)
    env = environment(work / "mlflow.db")
    paths = [f"paths.pairs={pairs_dir}", f"paths.features={work / 'features'}", f"paths.train={work / 'train'}",
             f"mlflow.artifact_location={work / 'mlruns'}", "mlflow.log_checkpoints=true"]
    cfg = compose_config(["train=smoke", *paths])
    write_cache(cfg)  # what the features stage does
    train = [sys.executable, str(PROJECT_ROOT / "src/train.py"), "train=smoke", *paths]
    last = work / "train" / "checkpoints" / "last.ckpt"
    log = work / "killed.log"
    with log.open("w") as sink:
        process = subprocess.Popen([*train, "trainer.max_steps=200", "trainer.val_check_interval=200"],
                                   cwd=work, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    step = 0
    while step < 2:
        assert process.poll() is None, f"training ended before it was killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.5)
        if last.is_file():  # Lightning writes checkpoints atomically (temporary file, then rename)
            step = torch.load(last, map_location="cpu", weights_only=False, mmap=True)["global_step"]
    process.kill()
    process.wait()
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    killed = client.search_runs(client.get_experiment_by_name("s2match-matcher-smoke").experiment_id)[0]
    return {"work": work, "env": env, "train": train, "client": client, "run_id": killed.info.run_id,
            "checkpoint_step": step}


def test_killed_run_loses_at_most_one_checkpoint_interval(killed_run):
    logged = losses(killed_run["client"], killed_run["run_id"])
    every = compose_config(["train=smoke"]).train.checkpoint_every
    # train/loss of step s is logged at s - 1: steps done = last logged + 1
    assert max(logged) + 1 - killed_run["checkpoint_step"] <= every


@pytest.fixture(scope="module")
def resumed_run(killed_run) -> dict:
    target = killed_run["checkpoint_step"] + 2
    command([*killed_run["train"], "train.resume=last", f"trainer.max_steps={target}"], killed_run["work"],
            killed_run["env"])
    metrics = json.loads((killed_run["work"] / "train" / "metrics.json").read_text())
    return {**killed_run, "metrics": metrics, "target": target}


def test_resume_continues_the_step_count(resumed_run):
    client, run_id = resumed_run["client"], resumed_run["metrics"]["mlflow_run_id"]
    assert run_id != resumed_run["run_id"]
    assert resumed_run["metrics"]["steps"] == resumed_run["target"]
    assert min(losses(client, run_id)) >= resumed_run["checkpoint_step"]
    assert client.get_run(run_id).data.tags["resumed_from"].endswith("last.ckpt")


def test_run_is_tracked_and_registered_in_mlflow(resumed_run):
    client, run_id = resumed_run["client"], resumed_run["metrics"]["mlflow_run_id"]
    run = client.get_run(run_id)
    assert {"train/loss", "val/auc3", "val/precision", "val/recall"} <= set(run.data.metrics)
    # the second stage, in the same run: the confidence heads, validated as adaptive depth runs
    assert {"confidence/train/loss", "confidence/val/loss", "confidence/val/layers", "confidence/val/auc3"} <= set(
        run.data.metrics)
    assert run.data.params["train/max_keypoints"] == "64" and run.data.params["features/name"] == "aliked"
    artifacts = {a.path for folder in ("model", "checkpoints") for a in client.list_artifacts(run_id, folder)}
    assert {"model/matcher.pt", "model/config.yaml", "checkpoints/last.ckpt"} <= artifacts
    versions = client.search_model_versions("name='s2match-lightglue-smoke'")
    assert run_id in {v.run_id for v in versions}
    assert int(resumed_run["metrics"]["registered_model_version"]) in {int(v.version) for v in versions}

    train_dir = resumed_run["work"] / "train"
    metrics = resumed_run["metrics"]
    assert set(metrics["before"]) == set(metrics["after"]) >= {"val/precision", "val/auc@3", "val/auc@10"}
    confidence = metrics["confidence"]
    assert confidence["steps"] == compose_config(["train=smoke"]).train.confidence.max_steps
    assert set(confidence["before"]) == set(confidence["after"]) >= {"val/layers", "val/loss", "val/auc@3"}
    curve = pd.read_csv(train_dir / "val_curve.csv")
    assert curve.step.iloc[0] == 0 and "val/auc3" in curve.columns
    # strict load of the exported head, its trained confidence heads with it
    exported = torch.load(train_dir / "matcher.pt")
    lightglue = build_lightglue("aliked", weights=str(train_dir / "matcher.pt"), filter_threshold=0.1,
                                depth_confidence=0.95, width_confidence=0.99)
    assert lightglue.weights_choice.kind == "trained" and any(key.startswith("token_confidence.") for key in exported)
    pretrained = build_lightglue("aliked", filter_threshold=0.1, depth_confidence=0.95, width_confidence=0.99)
    trained_heads, release_heads = (model.token_confidence[0].token[0].weight for model in (lightglue, pretrained))
    assert not torch.equal(trained_heads, release_heads)


def test_fast_preset_trains_lighterglue_with_the_same_code(killed_run):
    """preset=fast: XFeat's features cached and its 6-layer LighterGlue trained, both stages, in its own folders,
    its own registered model."""
    work, env = killed_run["work"], killed_run["env"]
    folders = [f"presets.fast.paths.features={work / 'features_fast'}", f"presets.fast.paths.train={work / 'fast'}",
               f"paths.pairs={work / 'pairs'}", f"mlflow.artifact_location={work / 'mlruns'}"]
    command([sys.executable, str(PROJECT_ROOT / "pipeline/features.py"), "train=smoke", "preset=fast", *folders],
            work, env)
    assert (work / "features_fast" / "xfeat" / "index.csv").is_file()
    command([sys.executable, str(PROJECT_ROOT / "src/train.py"), "train=smoke", "preset=fast", *folders], work, env)
    metrics = json.loads((work / "fast" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["confidence"]["steps"] == 2
    assert metrics["confidence"]["after"]["val/layers"] <= 6
    lightglue = build_lightglue("xfeat", weights=str(work / "fast" / "matcher.pt"), filter_threshold=0.1,
                                depth_confidence=0.95, width_confidence=0.99)
    assert lightglue.conf.n_layers == 6 and lightglue.weights_choice.kind == "trained"
    client = killed_run["client"]
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.tags["preset"] == "fast" and run.data.tags["features"] == "xfeat"
    assert metrics["mlflow_run_id"] in {v.run_id for v in client.search_model_versions("name='s2match-lighterglue'")}



@pytest.mark.slow
def test_dvc_stages_train_deterministically(killed_run, sample_dir, tmp_path):
    """The features and train stages in a scratch git + DVC copy; its seed-0 losses equal the killed run's."""
    for name in PROJECT_FILES:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, tmp_path / name)
    write_tiny_pairs(sample_dir, tmp_path / "outputs", TINY_SPLITS)
    (tmp_path / "params.yaml").write_text(render_params(compose_config(["train=smoke"], PIPELINE_CONFIG)))
    env = killed_run["env"]  # the same MLflow store: no second database to create
    command(["git", "init", "-q"], tmp_path, env)
    command(["git", "add", "."], tmp_path, env)
    command(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], tmp_path, env)

    out = command(["dvc", "repro", "--single-item", "features", "train"], tmp_path, env)
    assert "Running stage 'features'" in out and "Running stage 'train'" in out
    assert "val/auc@3" in command(["dvc", "metrics", "show", "--json"], tmp_path, env)
    assert "Running stage" not in command(["dvc", "repro", "--single-item", "features", "train"], tmp_path, env)

    run_id = json.loads((tmp_path / "outputs/train/metrics.json").read_text())["mlflow_run_id"]
    fresh = losses(killed_run["client"], run_id)
    killed = losses(killed_run["client"], killed_run["run_id"])
    # same seed, data and schedule start (no warmup): the first losses agree exactly (those the killed run's
    # logger had written when it was killed)
    first = sorted(set(fresh) & set(killed))[:2]
    assert 0 in first and [fresh[step] for step in first] == [killed[step] for step in first]
