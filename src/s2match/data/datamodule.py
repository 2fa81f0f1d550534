"""Lightning data over the feature cache: batches in the format of s2match.training.module.MatcherModule."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from s2match.data.featurecache import FEATURE_KEYS, load_entry, read_index

log = logging.getLogger(__name__)

# Per-keypoint tensors, cut together to the strongest `max_keypoints` (the cache stores them by decreasing score).
PER_KEYPOINT = tuple(key for key in FEATURE_KEYS if key != "scores")


class CachedPairs(Dataset):
    """The cached pairs of some splits, each with at most `max_keypoints` keypoints per image."""

    def __init__(self, directory: str | Path, splits: list[str], max_keypoints: int | None = None) -> None:
        self.directory = Path(directory)
        index = read_index(self.directory, splits)
        if index.empty:
            raise ValueError(f"{self.directory}: no cached pairs of split(s) {splits} (check cache.splits)")
        # a pair without keypoints in one image has nothing to learn from
        empty = (index["num_keypoints0"] == 0) | (index["num_keypoints1"] == 0)
        for pair_id in index.loc[empty, "pair_id"]:
            log.warning("skipped pair %s: no keypoints in one image", pair_id)
        self.index = index[~empty].reset_index(drop=True)
        self.max_keypoints = max_keypoints

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = load_entry(self.directory, self.index.at[i, "file"])
        item = {"pair_id": entry["pair_id"], "H": entry["H"]}
        for side in ("0", "1"):
            item[f"image_size{side}"] = entry[f"image_size{side}"]
            for key in PER_KEYPOINT:
                if f"{key}{side}" in entry:
                    item[f"{key}{side}"] = entry[f"{key}{side}"][: self.max_keypoints]
        return item


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pairs into a batch, cutting each image side to the smallest keypoint count of the batch.

    LightGlue's assignment has no padding mask, so a batch needs equal counts; the cut drops the weakest points.
    """
    batch: dict[str, Any] = {"pair_id": [item["pair_id"] for item in items],
                             "H": torch.stack([item["H"] for item in items])}
    for side in ("0", "1"):
        count = min(len(item[f"keypoints{side}"]) for item in items)
        batch[f"image_size{side}"] = torch.stack([item[f"image_size{side}"] for item in items])
        for key in PER_KEYPOINT:
            if f"{key}{side}" in items[0]:
                batch[f"{key}{side}"] = torch.stack([item[f"{key}{side}"][:count] for item in items])
    return batch


class FeatureDataModule(pl.LightningDataModule):
    """Train / val loaders over a feature cache folder (`<paths.features>/<feature name>`)."""

    def __init__(self, directory: str | Path, max_keypoints: int | None = None, batch_size: int = 1,
                 num_workers: int = 0, seed: int = 0, train_split: str = "train", val_split: str = "val") -> None:
        super().__init__()
        self.directory = Path(directory)
        self.max_keypoints = max_keypoints
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.train_split = train_split
        self.val_split = val_split

    @classmethod
    def from_config(cls, cfg) -> FeatureDataModule:
        return cls(Path(cfg.paths.features) / str(cfg.features.name), cfg.train.max_keypoints, cfg.train.batch_size,
                   cfg.train.num_workers, cfg.seed)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_set = CachedPairs(self.directory, [self.train_split], self.max_keypoints)
        if stage in (None, "fit", "validate"):
            self.val_set = CachedPairs(self.directory, [self.val_split], self.max_keypoints)

    def _loader(self, dataset: CachedPairs, shuffle: bool) -> DataLoader:
        # the generator makes the shuffled order a function of the seed alone
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.num_workers, collate_fn=collate_pairs,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
