"""One way to get the configuration for every entry script.

`conf/` (Hydra) is the single source of truth. DVC stages read `params.yaml`, which is the composed `conf/`
(DVC's Hydra composition writes it on `dvc exp run -S key=value`; `python -m s2match.config` rewrites it after
an edit of `conf/`, and a test checks that the committed copy is in sync).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from s2match.fileio import write_text

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
PARAMS_FILE = PROJECT_ROOT / "params.yaml"
PARAMS_FLAG = "--params"


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra command-line overrides (`train=long`, `+pair=demo`, `a.b=1`)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def load_config(argv: list[str] | None = None) -> DictConfig:
    """Configuration for an entry script from its command line.

    `--params FILE [override ...]` reads an already composed file (what DVC stages do, so that
    `dvc exp run -S` overrides reach them); an override is `key=value`, or `+group=name` to add the config
    `conf/<group>/<name>.yaml` (e.g. `+pair=demo`). Anything else is a list of Hydra overrides on `conf/`.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == PARAMS_FLAG:
        if len(args) < 2:
            raise SystemExit(f"error: {PARAMS_FLAG} needs a file name")
        path = Path(args[1])
        if not path.is_file():
            raise SystemExit(f"error: {path}: parameters file not found")
        cfg = OmegaConf.load(path)
        for override in args[2:]:
            key, _, value = override.partition("=")
            group_file = CONF_DIR / key.lstrip("+") / f"{value}.yaml"
            if key.startswith("+") and "." not in key and group_file.is_file():
                cfg[key[1:]] = OmegaConf.load(group_file)
            else:
                cfg.merge_with_dotlist([override.lstrip("+")])
        return cfg
    return compose_config(args)


def render_params(cfg: DictConfig) -> str:
    """params.yaml text for a composed config, written exactly as DVC's Hydra composition writes it."""
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def main() -> None:
    """Regenerate params.yaml from conf/ (run after editing conf/)."""
    write_text(PARAMS_FILE, render_params(compose_config(sys.argv[1:])))
    print(f"wrote {PARAMS_FILE.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    main()
