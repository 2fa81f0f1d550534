"""DVC stages `features`, `features_fast` (preset=fast): local features of the configured splits' pairs, extracted
once (s2match.data.featurecache)."""

import torch

from s2match.cli import run
from s2match.data.featurecache import cache_dir, write_cache
from s2match.presets import with_preset


def main(cfg) -> None:
    cfg = with_preset(cfg)
    torch.set_num_threads(int(cfg.threads))
    index = write_cache(cfg)
    per_split = ", ".join(f"{split} {count}" for split, count in index["split"].value_counts().sort_index().items())
    print(f"{cache_dir(cfg.paths.features, cfg.features)}: {len(index)} pairs cached, {per_split}")


if __name__ == "__main__":
    run(main, __doc__, ("features", "cache"))
