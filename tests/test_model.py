from pathlib import Path

import lightning as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from s2match.head import LightGlueHead
from s2match.matcher import build_lightglue
from s2match.model import MatcherModule, lightglue_inputs

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"feature": "aliked", "pretrained": False, "matcher": {"n_layers": 2}, "lr": 1e-3}


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
    cfg = OmegaConf.create(
        {"model": OmegaConf.load(ROOT / "conf/model/lightglue.yaml"), "optim": OmegaConf.load(ROOT / "conf/optim/adamw.yaml")}
    )
    cfg.model.pretrained = False
    cfg.model.matcher.n_layers = 1
    module = MatcherModule.from_config(cfg)
    assert module.head.n_layers == 1
    assert module.head.lightglue.conf.depth_confidence == -1 and module.head.lightglue.conf.width_confidence == -1
    assert module.hparams.lr == cfg.optim.lr


def test_head_matches_kornia_forward_with_pretrained_weights(pair):
    lightglue = build_lightglue("aliked", depth_confidence=-1, width_confidence=-1)
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
        LightGlueHead(build_lightglue("aliked", pretrained=False, n_layers=1))


def test_validation_metrics_of_pretrained_matcher(pair):
    module = MatcherModule("aliked", pretrained=True)
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
    initial = MatcherModule(**SMALL).lightglue_state_dict()
    assert any(not torch.equal(first[key], initial[key]) for key in first)  # training moved the weights
    reloaded = build_lightglue("aliked", weights=exported[0], n_layers=2)
    assert all(torch.equal(value, first[key]) for key, value in reloaded.state_dict().items())
