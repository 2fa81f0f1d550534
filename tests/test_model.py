"""The trainable LightGlue head: layer-wise outputs equal to kornia's, both training stages (matcher, confidence
heads), the exported weights, and adaptive depth and width with the trained confidence heads."""

import lightning as pl
import pytest
import torch
from kornia.feature.lightglue import filter_matches
from torch.utils.data import DataLoader

from s2match.config import compose_config
from s2match.evaluation.metrics import mean_corner_error
from s2match.models.lightglue import build_lightglue
from s2match.models.matchers import build_matcher
from s2match.training.layerwise import LightGlueHead
from s2match.training.loss import confidence_loss, confidence_targets
from s2match.training.module import MatcherModule, lightglue_inputs
from s2match.twoview.estimators import RobustEstimator

RUNTIME = {"filter_threshold": 0.1, "depth_confidence": -1, "width_confidence": -1}
ADAPTIVE = {"filter_threshold": 0.1, "depth_confidence": 0.95, "width_confidence": 0.99}
ESTIMATOR = {"method": "usac_magsac", "threshold": 3.0, "confidence": 0.9999, "max_iters": 10000, "min_inliers": 8}
TRAINING = {"filter_threshold": 0.1, "depth_confidence": 0.95, "pos_th": 3.0, "neg_th": 5.0, "nll_balancing": 0.5,
            "precision_th": 3.0, "estimator": ESTIMATOR, "weight_decay": 0.0}
SMALL = {"feature": "aliked", "weights": "random", "n_layers": 2, "lr": 1e-3, **TRAINING}


@pytest.fixture(scope="module")
def pair(warped_pair):
    return warped_pair


def _loader(pair, max_keypoints=None):
    """A one-pair loader; `max_keypoints` keeps the strongest (features come sorted by score) to save time."""
    if max_keypoints is not None:
        keep = ("keypoints0", "descriptors0", "keypoints1", "descriptors1")
        pair = {key: value[:max_keypoints] if key in keep else value for key, value in pair.items()}
    return DataLoader([pair], batch_size=1)


def _trainer(**kwargs):
    options = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
    }
    return pl.Trainer(**{**options, **kwargs})


def test_config_groups_build_the_module():
    cfg = compose_config(["model.weights=random", "model.n_layers=1"])
    module = MatcherModule.from_config(cfg)
    assert module.head.n_layers == 1
    assert module.head.lightglue.conf.depth_confidence == -1 and module.head.lightglue.conf.width_confidence == -1
    assert module.hparams.lr == cfg.optim.lr and module.hparams.depth_confidence == cfg.matcher.depth_confidence
    confidence = MatcherModule.from_config(cfg, stage="confidence")
    assert confidence.hparams.lr == cfg.train.confidence.lr and confidence.hparams.warmup_steps == 0
    # the release's depth by default: the fast preset's LighterGlue has 6 layers
    assert MatcherModule.from_config(compose_config(["features=xfeat"])).head.n_layers == 6


def test_head_matches_kornia_forward_with_pretrained_weights(pair):
    lightglue = build_lightglue("aliked", **RUNTIME)
    batch = next(iter(_loader(pair, max_keypoints=128)))
    inputs = lightglue_inputs(batch)
    with torch.no_grad():
        reference = lightglue(inputs)
        output = LightGlueHead(lightglue)(inputs)
    assert len(output["log_assignments"]) == 9 and len(output["confidence_logits"]) == 8
    torch.testing.assert_close(output["log_assignments"][-1], reference["log_assignment"])
    assert torch.equal(output["matches0"], reference["matches0"])
    # kornia's adaptive depth (no pruning) stops where the head's simulation of it does, with that layer's matches
    adaptive = build_lightglue("aliked", filter_threshold=0.1, depth_confidence=0.95, width_confidence=-1)
    with torch.no_grad():
        stopped = adaptive(inputs)
    layers = LightGlueHead(lightglue).early_stop_layer(output["confidence_logits"], 0, 0.95)
    assert stopped["stop"] == layers < 9
    matches0 = filter_matches(output["log_assignments"][layers - 1], 0.1)[0]
    assert torch.equal(stopped["matches0"], matches0)


def test_confidence_targets_and_loss():
    torch.manual_seed(0)
    final = torch.randn(1, 5, 4).log_softmax(-1)
    agree0, agree1 = confidence_targets(final, final)
    assert agree0.shape == (1, 4) and agree1.shape == (1, 3) and agree0.all() and agree1.all()
    other = final.clone()
    other[0, 0] = other[0, 0].flip(-1)  # keypoint 0 of image0 changes its best entry
    agree0, _ = confidence_targets(other, final)
    assert agree0.tolist() == [[0.0, 1.0, 1.0, 1.0]]
    # confident where the layer agrees, unsure where not: a lower loss than unsure everywhere
    logits = [(10 * (2 * agree0 - 1), torch.full((1, 3), 10.0))]
    unsure = [(torch.zeros(1, 4), torch.zeros(1, 3))]
    assert confidence_loss(logits, [other, final]) < 1e-3 < confidence_loss(unsure, [other, final])
    with pytest.raises(ValueError, match="one pair of logits per layer"):
        confidence_loss(logits, [final])


def test_head_refuses_pruning():
    with pytest.raises(ValueError, match="width_confidence=-1"):
        LightGlueHead(build_lightglue("aliked", weights="random", n_layers=1, filter_threshold=0.1,
                                      depth_confidence=0.95, width_confidence=0.99))


def test_validation_metrics_of_pretrained_matcher(pair):
    module = MatcherModule("aliked", "pretrained", None, lr=1e-4, warmup_steps=0, min_lr_ratio=1.0, **TRAINING)
    metrics = _trainer().validate(module, _loader(pair, max_keypoints=128), verbose=False)[0]
    for key in ("val/loss", "val/precision", "val/recall", "val/auc@1", "val/auc@3", "val/auc@5", "val/auc@10"):
        assert key in metrics
    # a synthetic warp of one image: the released matcher gets it nearly right
    assert metrics["val/precision"] > 0.8
    assert 0.3 < metrics["val/recall"] <= 1.0
    assert metrics["val/auc@10"] > 50


def test_training_is_deterministic_with_warmup_and_exports_loadable_weights(pair, tmp_path):
    exported, lrs = [], []

    class RecordLr(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    for run in range(2):
        pl.seed_everything(0)
        module = MatcherModule(**SMALL, warmup_steps=2, min_lr_ratio=0.1)
        trainer = _trainer(max_steps=4, limit_val_batches=0, callbacks=[RecordLr()])
        trainer.fit(module, _loader(pair, max_keypoints=64))
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        exported.append(module.export_weights(tmp_path / f"run{run}.pth"))
    # linear warmup from lr / warmup_steps, then cosine from lr down to lr * min_lr_ratio at the last step
    assert lrs[:4] == pytest.approx([5e-4, 7.5e-4, 1e-3, 5.5e-4])
    first, second = (torch.load(path) for path in exported)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    pl.seed_everything(0)
    initial = MatcherModule(**SMALL, warmup_steps=0, min_lr_ratio=1.0).lightglue_state_dict()
    assert any(not torch.equal(first[key], initial[key]) for key in first)  # training moved the weights
    reloaded = build_lightglue("aliked", weights=exported[0], n_layers=2, **RUNTIME)
    assert all(torch.equal(value, first[key]) for key, value in reloaded.state_dict().items())
    # the first stage leaves the confidence heads as they were: they have no loss there
    assert all(torch.equal(first[key], initial[key]) for key in first if key.startswith("token_confidence."))


@pytest.fixture(scope="module")
def confidence_run(pair, tmp_path_factory) -> dict:
    """The confidence stage on the pretrained ALIKED LightGlue whose confidence heads were reset (so that what
    they know comes from this training), on the pair (128 keypoints), exported."""
    pl.seed_everything(0)
    module = MatcherModule("aliked", "pretrained", None, lr=5e-2, warmup_steps=0, min_lr_ratio=1.0,
                           stage="confidence", **TRAINING)
    for classifier in module.head.lightglue.token_confidence:
        classifier.token[0].reset_parameters()
    initial = module.lightglue_state_dict()
    batch = next(iter(_loader(pair, max_keypoints=128)))
    with torch.no_grad():
        untrained = module(batch)
    trainer = _trainer(max_steps=12, limit_val_batches=0)
    trainer.fit(module, _loader(pair, max_keypoints=128))
    with torch.no_grad():
        output = module(batch)
    return {"module": module, "initial": initial, "batch": batch, "untrained": untrained, "output": output,
            "weights": module.export_weights(tmp_path_factory.mktemp("confidence") / "matcher.pt")}


def test_confidence_stage_trains_only_the_confidence_heads(confidence_run):
    initial, trained = confidence_run["initial"], confidence_run["module"].lightglue_state_dict()
    changed = {key for key in trained if not torch.equal(trained[key], initial[key])}
    assert changed and all(key.startswith("token_confidence.") for key in changed)
    untrained, output = confidence_run["untrained"], confidence_run["output"]
    assert confidence_loss(output["confidence_logits"], output["log_assignments"]) < confidence_loss(
        untrained["confidence_logits"], untrained["log_assignments"])
    head = confidence_run["module"].head
    # reset classifiers are never confident enough to stop; trained ones stop this easy pair early
    assert head.early_stop_layer(untrained["confidence_logits"], 0, 0.95) == 9
    assert head.early_stop_layer(output["confidence_logits"], 0, 0.95) < 9


def test_exported_weights_load_with_the_confidence_heads_and_match_as_trained(confidence_run):
    module, batch, output = confidence_run["module"], confidence_run["batch"], confidence_run["output"]
    inputs = lightglue_inputs(batch)
    trained = module.lightglue_state_dict()
    full = build_lightglue("aliked", weights=confidence_run["weights"], **RUNTIME)  # strict load
    assert all(torch.equal(value, trained[key]) for key, value in full.state_dict().items())
    adaptive = build_lightglue("aliked", weights=confidence_run["weights"], filter_threshold=0.1,
                               depth_confidence=0.95, width_confidence=-1)
    with torch.no_grad():
        reference, stopped = full(inputs), adaptive(inputs)
    assert torch.equal(reference["matches0"], output["matches0"])
    # adaptive depth where the trained module's validation expects it, with the matches of that layer
    layers = module.head.early_stop_layer(output["confidence_logits"], 0, 0.95)
    assert stopped["stop"] == layers < 9
    assert torch.equal(stopped["matches0"], filter_matches(output["log_assignments"][layers - 1], 0.1)[0])


def test_easy_pair_stops_early_within_a_pixel(confidence_run, pair):
    """The exported head through the inference matcher, adaptive depth and width on: fewer layers, and the
    homography within 1 px of the full-depth one and of the truth."""
    estimator = RobustEstimator.from_config(ESTIMATOR)
    feats = [{"keypoints": pair[f"keypoints{side}"][:128], "descriptors": pair[f"descriptors{side}"][:128]}
             for side in "01"]
    H_true = pair["H"].double().numpy()
    homographies, layers = [], []
    for options in (RUNTIME, ADAPTIVE):
        matcher = build_matcher({"name": "lightglue", "weights": str(confidence_run["weights"]), **options}, "aliked")
        result = matcher.match(*feats, (256, 256), (256, 256))
        pts0, pts1 = (feats[side]["keypoints"][result["matches"][:, side]].double().numpy() for side in (0, 1))
        homographies.append(estimator.fit(pts0, pts1).H)
        layers.append(result["layers"])
    assert layers[0] == 9 and layers[1] < 9
    assert mean_corner_error(homographies[1], homographies[0], 256, 256) < 1.0
    assert mean_corner_error(homographies[1], H_true, 256, 256) < 1.0
