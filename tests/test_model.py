
import lightning as pl
import pytest
import torch
from torch.utils.data import DataLoader

from s2match.config import compose_config
from s2match.models.lightglue import build_lightglue
from s2match.training.layerwise import LightGlueHead
from s2match.training.module import MatcherModule, lightglue_inputs

RUNTIME = {"filter_threshold": 0.1, "depth_confidence": -1, "width_confidence": -1}
ESTIMATOR = {"method": "usac_magsac", "threshold": 3.0, "confidence": 0.9999, "max_iters": 10000, "min_inliers": 8}
TRAINING = {"pos_th": 3.0, "neg_th": 5.0, "nll_balancing": 0.5, "precision_th": 3.0, "estimator": ESTIMATOR,
            "weight_decay": 0.0}
SMALL = {"feature": "aliked", "weights": "random", "matcher": {"n_layers": 2, "filter_threshold": 0.1}, "lr": 1e-3,
         **TRAINING}


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
    cfg = compose_config(["model.weights=random", "model.matcher.n_layers=1"])
    module = MatcherModule.from_config(cfg)
    assert module.head.n_layers == 1
    assert module.head.lightglue.conf.depth_confidence == -1 and module.head.lightglue.conf.width_confidence == -1
    assert module.hparams.lr == cfg.optim.lr


def test_head_matches_kornia_forward_with_pretrained_weights(pair):
    lightglue = build_lightglue("aliked", **RUNTIME)
    batch = next(iter(_loader(pair, max_keypoints=128)))
    inputs = lightglue_inputs(batch)
    with torch.no_grad():
        reference = lightglue(inputs)
        output = LightGlueHead(lightglue)(inputs)
    assert len(output["log_assignments"]) == 9
    torch.testing.assert_close(output["log_assignments"][-1], reference["log_assignment"])
    assert torch.equal(output["matches0"], reference["matches0"])


def test_head_refuses_pruning():
    with pytest.raises(ValueError, match="width_confidence=-1"):
        LightGlueHead(build_lightglue("aliked", weights="random", n_layers=1, filter_threshold=0.1,
                                      depth_confidence=0.95, width_confidence=0.99))


def test_validation_metrics_of_pretrained_matcher(pair):
    module = MatcherModule("aliked", {"n_layers": 9, "filter_threshold": 0.1}, "pretrained", lr=1e-4,
                           warmup_steps=0, min_lr_ratio=1.0, **TRAINING)
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
