"""Presets: named settings for a use, such as `accurate` and `fast` (conf/presets/<name>.yaml, composed at
`presets.<name>`). `preset=NAME` applies one to the configuration of src/infer.py, src/train.py and the features
stage; the evaluation and the benchmark run each preset as a method of the same name.

A preset, like an evaluation method, overrides groups of the configuration one level deep: a group it gives that
names another `name` (`features: {name: xfeat}`) is replaced (features are completed from
conf/features/<name>.yaml), otherwise its keys are set over the group's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from s2match.config import literal
from s2match.models.features import features_config


def override_group(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """A group's config with an override: merged when it names the same thing (or nothing), replaced when it names
    another (`features: {name: sift}` is SIFT with SIFT's defaults, not ALIKED's keys)."""
    if not override:
        return dict(base)
    if "name" in override and override["name"] != base.get("name"):
        return dict(override)
    return {**base, **override}


def with_preset(cfg: DictConfig) -> DictConfig:
    """The configuration, resolved, with the preset `cfg.preset` applied (a new config; `cfg` is unchanged)."""
    name, presets = cfg.preset, cfg.presets
    if name not in presets:
        raise ValueError(f"preset={name}: no such preset; known: {', '.join(presets)} (conf/presets/)")
    # resolved first: params.yaml (DVC stages) is resolved too, so both ways of configuring give the same result
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for group, override in resolved["presets"][name].items():
        if not isinstance(resolved.get(group), dict):
            raise ValueError(f"presets.{name}.{group}: not a group of the configuration")
        resolved[group] = override_group(resolved[group], override)
    resolved["features"] = features_config(resolved["features"])
    return OmegaConf.create(_as_literals(resolved))


def _as_literals(node: Any) -> Any:
    """Resolved values kept as they are when made a config again (a path holding `${` is no interpolation)."""
    if isinstance(node, dict):
        return {key: _as_literals(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_as_literals(value) for value in node]
    return literal(node) if isinstance(node, str) else node
