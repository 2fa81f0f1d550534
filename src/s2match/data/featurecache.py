"""Local features of every pair, extracted once with the frozen network and stored for training and evaluation.

Extraction is the slow part on CPU (ALIKED takes seconds per 512 px tile) while the frozen network gives the same
output every epoch, so each pair is extracted once into ``<cache>/<feature name>/<pair_id>.pt`` (a dict of
tensors, see ``extract_pair``) with ``index.csv`` beside it. Each entry carries a fingerprint of everything its
content depends on (extractor config, augmentation, the pair's files and homography): a re-run skips pairs whose
entry has the same fingerprint, so growing the pair set or resuming an interrupted run only extracts what is new.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import pandas as pd
import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm import tqdm

from s2match.data.pairs import load_pair, read_pairs
from s2match.fileio import atomic_path
from s2match.models.features import build_features, features_config
from s2match.models.weights import save_checkpoint
from s2match.twoview.pipeline import KeypointExtractor, resolve_device

log = logging.getLogger(__name__)

INDEX_NAME = "index.csv"
INDEX_COLUMNS = ["pair_id", "split", "file", "num_keypoints0", "num_keypoints1", "fingerprint"]
# Per-image keys of an extractor's output; stored with the image's suffix 0 / 1.
FEATURE_KEYS = ("keypoints", "descriptors", "scores", "scales", "oris")


def pairs_to_cache(pairs: pd.DataFrame, splits: list[str], max_pairs: Mapping[str, int | None] | None = None
                 ) -> pd.DataFrame:
    """The pairs of `splits`; `max_pairs` maps a split to its number of pairs (the first by pair_id: a stable
    choice), a split it does not name (or names with null) keeps all."""
    unknown = sorted(set(splits) - set(pairs["split"]))
    if unknown:
        raise ValueError(f"feature cache: no pairs of split(s) {unknown} in the pair table")
    limits = dict(max_pairs or {})
    chosen = [group.sort_values("pair_id").head(limits[split] if limits.get(split) is not None else len(group))
              for split, group in pairs[pairs["split"].isin(splits)].groupby("split", sort=True)]
    return pd.concat(chosen, ignore_index=True)


def build_augmentation(cfg: Mapping[str, Any] | None) -> nn.Module | None:
    """Photometric jitter applied to each image before extraction (seasonal look changes), or None when off.

    Keys: brightness, contrast (ColorJitter factors), gamma ([low, high]); all optional.
    """
    if not cfg:
        return None
    options = dict(cfg)
    unknown = sorted(set(options) - {"brightness", "contrast", "gamma"})
    if unknown:
        raise ValueError(f"feature cache: unknown augment options {unknown}; allowed: brightness, contrast, gamma")
    steps: list[nn.Module] = []
    if options.get("brightness") or options.get("contrast"):
        steps.append(K.ColorJitter(brightness=float(options.get("brightness") or 0),
                                   contrast=float(options.get("contrast") or 0), p=1.0))
    if options.get("gamma"):
        low, high = (float(v) for v in options["gamma"])
        steps.append(K.RandomGamma(gamma=(low, high), p=1.0))
    return nn.Sequential(*steps) if steps else None


def fingerprint(row: Mapping[str, Any], features_cfg: Mapping[str, Any], border_px: int,
                augment_cfg: Mapping[str, Any] | None, seed: int) -> str:
    """Hash of everything a cache entry depends on; the seed only matters when augmenting."""
    key = {
        "features": features_config(features_cfg),
        "border_px": int(border_px),
        "augment": dict(augment_cfg) if augment_cfg else None,
        "seed": int(seed) if augment_cfg else None,
        "pair": {name: str(row[name]) for name in ("pair_id", "path0", "path1", "width", "height", "warp",
                                                    "date_shift_x", "date_shift_y")},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _pair_seed(seed: int, pair_id: str) -> int:
    """A seed per pair, so an entry's augmentation does not depend on which other pairs were extracted before."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()[:8], "little") & (2**63 - 1)


def extract_pair(row: Mapping[str, Any], extractor: KeypointExtractor, augmentation: nn.Module | None,
                 seed: int) -> dict[str, Any]:
    """Cache entry of one pair: <key>0 / <key>1 for FEATURE_KEYS the extractor gives, image_size0/1 (2,) as
    (w, h), H (3, 3) float64 (image0 px -> image1 px), pair_id and split. The extractor is the two-view
    pipeline's, so training sees the keypoints inference and evaluation see."""
    pair_id = str(row["pair_id"])
    image0, image1, H = load_pair(row)
    entry: dict[str, Any] = {"pair_id": pair_id, "split": str(row["split"]), "H": torch.from_numpy(H)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_pair_seed(seed, pair_id))
        for side, image in (("0", image0), ("1", image1)):
            found = extractor(image, augmentation)
            entry.update({f"{key}{side}": found[key].cpu() for key in FEATURE_KEYS if key in found})
            entry[f"image_size{side}"] = torch.tensor([image.shape[-1], image.shape[-2]], dtype=torch.float32)
    return entry


def _cached_fingerprint(path: Path) -> str | None:
    """The fingerprint of an existing entry, or None if there is none or it cannot be read."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("fingerprint")
    except (RuntimeError, OSError, EOFError, ValueError):
        log.warning("%s: unreadable cache entry, extracting it again", path)
        return None


def cache_dir(root: str | Path, features_cfg: Mapping[str, Any]) -> Path:
    return Path(root) / str(features_cfg["name"])


def build_cache(pairs: pd.DataFrame, features_cfg: Mapping[str, Any], border_px: int, root: str | Path,
                augment_cfg: Mapping[str, Any] | None = None, seed: int = 0, device: str = "cpu") -> pd.DataFrame:
    """Extract and store the features of `pairs` under `root/<feature name>/` on `device` (auto | cpu | cuda),
    the training split's images jittered by `augment_cfg`; write and return its index. Entries already there with
    the same fingerprint are kept as they are."""
    directory = cache_dir(root, features_cfg)
    directory.mkdir(parents=True, exist_ok=True)
    rows = pairs.to_dict("records")
    # only training pairs are jittered: validation picks the checkpoint on the images as they are
    augments = [augment_cfg if row["split"] == "train" else None for row in rows]
    prints = [fingerprint(row, features_cfg, border_px, augment, seed) for row, augment in zip(rows, augments)]
    todo = [i for i, (row, print_) in enumerate(zip(rows, prints))
            if _cached_fingerprint(directory / f"{row['pair_id']}.pt") != print_]
    log.info("feature cache %s: %d pairs, %d already cached, %d to extract", directory, len(rows),
             len(rows) - len(todo), len(todo))
    if todo:
        extractor = KeypointExtractor(build_features(features_cfg), border_px, resolve_device(device))
        augmentation = build_augmentation(augment_cfg)
        for i in tqdm(todo, desc=f"{features_cfg['name']} features", unit="pair"):
            entry = extract_pair(rows[i], extractor, augmentation if augments[i] else None, seed)
            entry["fingerprint"] = prints[i]
            save_checkpoint(entry, directory / f"{rows[i]['pair_id']}.pt")
    index = pd.DataFrame([_index_row(directory, row["pair_id"], print_) for row, print_ in zip(rows, prints)],
                         columns=INDEX_COLUMNS)
    with atomic_path(directory / INDEX_NAME) as tmp:
        index.to_csv(tmp, index=False)
    return index


def _index_row(directory: Path, pair_id: str, print_: str) -> dict[str, Any]:
    entry = torch.load(directory / f"{pair_id}.pt", map_location="cpu", weights_only=True, mmap=True)
    return {"pair_id": pair_id, "split": entry["split"], "file": f"{pair_id}.pt",
            "num_keypoints0": len(entry["keypoints0"]), "num_keypoints1": len(entry["keypoints1"]),
            "fingerprint": print_}


def read_index(directory: str | Path, splits: list[str] | None = None) -> pd.DataFrame:
    """The index of a feature cache folder, restricted to `splits`."""
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature cache index not found (run the features stage)")
    index = pd.read_csv(path, keep_default_na=False)
    missing = sorted(set(INDEX_COLUMNS) - set(index.columns))
    if missing:
        raise ValueError(f"{path}: not a feature cache index, columns {missing} missing")
    return index if splits is None else index[index["split"].isin(splits)].reset_index(drop=True)


def load_entry(directory: str | Path, file: str) -> dict[str, Any]:
    path = Path(directory) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: cache entry listed in the index is missing (re-run the features stage)")
    return torch.load(path, map_location="cpu", weights_only=True)


def write_cache(cfg) -> pd.DataFrame:
    """The features stage: the configured splits of paths.pairs/pairs.csv into paths.features, on cfg.device."""
    cache = OmegaConf.to_container(cfg.cache, resolve=True)
    pairs = pairs_to_cache(read_pairs(Path(cfg.paths.pairs) / "pairs.csv"), cache["splits"], cache["max_pairs"])
    features_cfg = OmegaConf.to_container(cfg.features, resolve=True)
    return build_cache(pairs, features_cfg, cfg.registration.border_px, cfg.paths.features, cache["augment"],
                       cfg.seed, str(cfg.device))
