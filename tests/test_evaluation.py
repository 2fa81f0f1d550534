"""The evaluation stage on real test pairs of the sample: failures, skipped methods, outputs, the MLflow run."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf, open_dict
from rasterio.windows import Window

from s2match.config import PROJECT_ROOT, compose_config
from s2match.evaluation.metrics import auc
from s2match.evaluation.report import FILES
from s2match.evaluation.runner import (
    Method,
    MethodSpec,
    build_methods,
    evaluate,
    evaluate_methods,
    method_specs,
    pairs_by_kind,
    summary_table,
)
from s2match.inference.registration import FeatureCache
from s2match.inference.scenes import ArrayScene
from s2match.models.lightglue import build_lightglue
from s2match.timeseries.synthetic import shifted

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JP2 = PROJECT_ROOT / "data" / "sample" / "jp2" / "T33UUU" / "20160529.jp2"


@pytest.fixture(scope="module")
def mlflow_dir(tmp_path_factory):
    """One tracking store for the module: creating an MLflow database takes seconds."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def smoke_cfg(cfg, stages, mlflow_dir, tmp_path):
    """The smoke evaluation on the fixture's test pairs, writing only under temporary folders."""
    return compose_config([
        "evaluate=smoke", f"paths.pairs={stages['dir'] / 'pairs'}", f"paths.train={tmp_path / 'train'}",
        f"paths.evaluate={tmp_path / 'evaluate'}", f"mlflow.tracking_uri=sqlite:///{mlflow_dir / 'mlflow.db'}",
        f"mlflow.artifact_location={mlflow_dir / 'artifacts'}",
    ])


def test_method_without_matches_counts_as_failure(smoke_cfg, stages):
    test_pairs = pairs_by_kind(stages["pairs"][stages["pairs"]["split"] == "test"], 1)
    sift = next(spec for spec in method_specs(smoke_cfg) if spec.name == "sift")
    # a ratio no real pair of descriptors passes: the method returns no matches at all
    silent = Method(MethodSpec("silent", {**sift.config, "matcher": {"name": "ratio", "ratio": 1e-9}}))
    records, outputs = evaluate([silent], test_pairs, 3.0)

    record = records.iloc[0]
    assert record["n_matches"] == 0 and record["n_keypoints0"] > 0
    assert record["failed"] and record["reason"]
    assert math.isinf(record["corner_error"])
    assert record["precision"] == 0.0 and record["n_inliers"] == 0
    assert not outputs[("silent", record["pair_id"])].success
    overall = summary_table(records, ["silent"]).loc[("silent", "all")]
    assert overall["failure_rate"] == 1.0
    assert overall["auc@10"] == 0.0


def test_method_specs_complete_the_project_config_and_reject_bad_entries(smoke_cfg):
    specs = {spec.name: spec for spec in method_specs(smoke_cfg)}
    # defaults of conf/features/sift.yaml, with the smoke config's max_keypoints
    assert specs["sift"].config["features"]["max_keypoints"] == 256
    assert specs["sift"].config["features"]["rootsift"] is True
    # another matcher name replaces the group; the same name overrides its keys
    assert specs["sift"].config["matcher"] == {"name": "ratio", "ratio": 0.8}
    assert specs["trained"].config["matcher"] == OmegaConf.to_container(smoke_cfg.matcher, resolve=True)
    assert specs["sift"].config["registration"]["refine"] is False and specs["trained"].config["registration"]["refine"]

    with open_dict(smoke_cfg):
        smoke_cfg.evaluate.methods[0].weights = "x.pt"
        with pytest.raises(ValueError, match=r"unknown keys \['weights'\]"):
            method_specs(smoke_cfg)
        smoke_cfg.evaluate.methods[0].pop("weights")
    smoke_cfg.evaluate.methods[1].name = "sift"
    with pytest.raises(ValueError, match="duplicated method names"):
        method_specs(smoke_cfg)


def test_methods_with_one_extractor_and_matcher_share_their_features_and_matches():
    specs = [spec for spec in method_specs(compose_config()) if spec.name.startswith("trained")
             or spec.name == "accurate"]
    methods = {method.name: method for method in build_methods(specs)}
    assert len({id(method.pipeline.extractor) for method in methods.values()}) == 1
    steps = [methods[name] for name in ("trained_matches", "trained_second_pass", "trained")]
    assert len({id(method.pipeline.matcher) for method in steps}) == 1
    assert methods["accurate"].pipeline.matcher is not steps[0].pipeline.matcher  # adaptive depth and width

    # a real crop and its sub-pixel shift: `trained` is trained_second_pass plus the refinement, matched once
    with rasterio.open(JP2) as src:
        crop = src.read(window=Window(600, 600, 512, 512)).astype(np.float32)
    moved = shifted(crop[0], (0.3, -0.2))[None]
    cache = FeatureCache()
    second, every = (methods[name].register(ArrayScene.of(crop, "crop"), ArrayScene.of(moved, "moved"), cache)
                     for name in ("trained_second_pass", "trained"))
    np.testing.assert_array_equal(second.matches.pts0, every.matches.pts0)
    assert every.timings["match_s"] == second.timings["match_s"] > 0  # charged as if run alone
    assert every.timings["reused_s"] == pytest.approx(every.timings["extract_s"] + every.timings["match_s"])


def test_missing_trained_weights_run_the_pretrained_head_and_say_so(smoke_cfg, caplog):
    smoke_cfg.evaluate.max_pairs = 1
    smoke_cfg.evaluate.methods = [m for m in smoke_cfg.evaluate.methods if m.name in ("sift", "trained")]
    with caplog.at_level(logging.WARNING):
        evaluation = evaluate_methods(smoke_cfg)

    assert evaluation.weights["trained"].startswith("pretrained")
    assert any("matcher.pt" in message and "pretrained aliked LightGlue stands in" in message
               for message in caplog.messages)
    metrics = json.loads((evaluation.out_dir / FILES["metrics"]).read_text())
    assert list(metrics) == ["sift", "trained"]
    report = (evaluation.out_dir / FILES["report"]).read_text()
    assert "- trained: pretrained (" in report and "- sift: none" in report


def test_smoke_evaluation_end_to_end(smoke_cfg, tmp_path):
    weights = tmp_path / "train" / "matcher.pt"
    weights.parent.mkdir()
    torch.save(build_lightglue("aliked", filter_threshold=0.1, depth_confidence=-1, width_confidence=-1).state_dict(),
               weights)

    evaluation = evaluate_methods(smoke_cfg)

    out = evaluation.out_dir
    assert evaluation.weights["trained"] == f"trained ({weights})"
    for name in FILES.values():
        assert (out / name).is_file(), name
    for name in ("cdf_png", "bars_png", "best_png", "worst_png"):
        assert (out / FILES[name]).read_bytes()[:8] == PNG_MAGIC

    methods = ["sift", "xfeat_lighterglue", "trained"]
    metrics = json.loads((out / FILES["metrics"]).read_text())
    assert list(metrics) == methods
    # the shift-consistency protocol ran on the trained method: every registration succeeded, sub-pixel
    shifts = pd.read_csv(out / FILES["shifts"])
    assert set(shifts["method"]) == {"trained"} and len(shifts) >= 1
    consistency = metrics["trained"].pop("shift_consistency")
    assert consistency["success"] == 1.0 and consistency["median_px"] < 0.3
    errors = pd.read_csv(out / FILES["errors"])
    assert len(errors) == 2 * len(methods)
    for method in methods:
        kinds = metrics[method]
        assert kinds["all"]["n_pairs"] == 2
        assert sum(values["n_pairs"] for kind, values in kinds.items() if kind != "all") == 2
        for values in kinds.values():
            for t in (1, 3, 5, 10):
                assert 0.0 <= values[f"auc@{t}"] <= 100.0
        # metrics.json agrees with the per-pair errors it summarises
        own = errors[errors["method"] == method]
        assert kinds["all"]["auc@3"] == pytest.approx(auc(own["corner_error"])["auc@3"], abs=1e-3)
        assert kinds["all"]["mean_matches"] == pytest.approx(own["n_matches"].mean(), abs=1e-3)
        assert (own["seconds"] >= own["extract_s"]).all()

    cdf = pd.read_csv(out / FILES["cdf"])
    assert list(cdf.columns) == ["threshold_px", *methods]
    for method in methods:
        assert np.all(np.diff(cdf[method]) >= 0)
        within = np.mean(errors.loc[errors["method"] == method, "corner_error"] <= cdf["threshold_px"].iloc[-1])
        assert cdf[method].iloc[-1] == pytest.approx(100 * within)

    report = (out / FILES["report"]).read_text()
    assert "## All pairs" in report and "## Shift consistency" in report
    assert all(f"| {method} | 2 |" in report for method in methods)
    assert "pair of trained" in report

    client = MlflowClient(smoke_cfg.mlflow.tracking_uri)
    run = client.get_run(evaluation.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["trained/all/auc3"] == pytest.approx(metrics["trained"]["all"]["auc@3"])
    assert run.data.params["method.trained.matcher.weights"] == str(weights)
    assert run.data.tags["weights.trained"] == f"trained ({weights})"
    assert {artifact.path for artifact in client.list_artifacts(evaluation.run_id)} >= set(FILES.values())
