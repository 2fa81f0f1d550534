"""One way to get the configuration for every entry script, with one-line errors for what a user can get wrong.

`conf/` (Hydra) is the single source of truth. Scripts compose `conf/config.yaml` with Hydra overrides
(`key=value`, `group=option`, `+pair=NAME`). DVC stages read `params.yaml`, which is `conf/pipeline.yaml` composed:
the scripts' configuration plus the pair of the `demo` stage (DVC's Hydra composition writes it on
`dvc exp run -S key=value`; `python -m s2match.config` rewrites it after an edit of `conf/`, and a test checks that
the committed copy is in sync). `--params FILE [override ...]` composes FILE as Hydra would a primary config beside
`conf/`, so a stage takes the same overrides either way.

Before Hydra composes, every override is checked against the configuration it applies to: an unknown key or group
option, or a value of the wrong type, is a `ConfigError` naming the override and the nearest valid names.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from s2match.fileio import write_text

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
PARAMS_FILE = PROJECT_ROOT / "params.yaml"
PARAMS_FLAG = "--params"
SCRIPT_CONFIG = "config"  # conf/config.yaml: what a script composes
PIPELINE_CONFIG = "pipeline"  # conf/pipeline.yaml: params.yaml (the DVC pipeline's, with the demo stage's pair)
PARAMS_FILE_CONFIG = "params_file"  # a --params file, stored for Hydra as a primary config


class ConfigError(ValueError):
    """A configuration the user got wrong; the message is one line naming the override, key or file."""


def config_groups() -> dict[str, list[str]]:
    """Config group -> its options (conf/<group>/<option>.yaml)."""
    return {folder.name: sorted(file.stem for file in folder.glob("*.yaml"))
            for folder in sorted(CONF_DIR.iterdir()) if folder.is_dir()}


def default_options() -> dict[str, str]:
    """Config group -> the option conf/config.yaml chooses (groups it does not name have none)."""
    entries = OmegaConf.load(CONF_DIR / f"{SCRIPT_CONFIG}.yaml").defaults
    return {group: option for entry in entries if isinstance(entry, DictConfig) for group, option in entry.items()}


def nearest(name: str, known: Iterable[str]) -> list[str]:
    """Up to three names of `known` closest to `name`: first by its last part (a misspelt key, or a key that moved
    to another group: infer.coarse_size -> registration.coarse_size), else by the whole name."""
    known = sorted(set(known))
    leaf = name.rsplit(".", 1)[-1]
    scores = {key: difflib.SequenceMatcher(None, leaf, key.rsplit(".", 1)[-1]).ratio() for key in known}
    by_leaf = sorted((key for key in known if scores[key] >= 0.8), key=lambda key: -scores[key])
    return by_leaf[:3] or difflib.get_close_matches(name, known, n=3, cutoff=0.6)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    close = nearest(name, known)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def dotted_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every key of a config as a dotted path (sections and their keys)."""
    keys = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        keys.append(path)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            keys += dotted_keys(node, f"{path}.")
    return keys


def parse_overrides(overrides: list[str]) -> list[Override]:
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            override, = parser.parse_overrides([text])
        except OverrideParseException as err:
            reason = err.message.splitlines()[0].removeprefix("Error parsing override ").strip(" '")
            raise ConfigError(f"{text}: not a valid override ({reason}); write KEY=VALUE, and quote a value with "
                              f"spaces, brackets, commas or other special characters: KEY='VALUE'") from err
        if override.is_sweep_override():
            raise ConfigError(f"{text}: a value with commas reads as several values; quote it (KEY='a,b') or write "
                              f"a list (KEY=[a,b])")
        parsed.append(override)
    return parsed


def is_group_choice(override: Override) -> bool:
    return (override.key_or_group in config_groups() and "." not in override.key_or_group
            and not override.is_delete() and isinstance(override.value(), str))


def check_group_choice(override: Override) -> None:
    group, option = override.key_or_group, override.value()
    options = config_groups()[group]
    if option not in options:
        prefix = override.input_line[: len(override.input_line) - len(override.input_line.lstrip("+~"))]
        raise ConfigError(f"{override.input_line}: no config conf/{group}/{option}.yaml"
                          f"{did_you_mean(f'{prefix}{group}={option}', [f'{prefix}{group}={o}' for o in options])} "
                          f"(options of {group}: {', '.join(options)})")


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", list: "a list [a,b]"}


def expected_type(default) -> type | None:
    """The type a value must have to replace `default` (None: any)."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return type(default)
    if isinstance(default, (ListConfig, list)):
        return list
    if isinstance(default, (DictConfig, dict)):
        return dict
    return None


def check_value(override: Override, reference: DictConfig) -> None:
    """An override of a key must name a key of `reference` (unless it adds one with +) and keep its value's type."""
    key, value = override.key_or_group, override.value()
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(reference, parent_key, throw_on_missing=False) if parent_key else reference
    if isinstance(parent, ListConfig):
        return  # an item of a list: Hydra checks the index
    exists = isinstance(parent, DictConfig) and leaf in parent.keys()  # keys(): a mandatory ??? key counts too
    if override.is_delete() or override.is_force_add() or (override.is_add() and not exists):
        return
    if not exists:
        raise ConfigError(f"{override.input_line}: no key {key} in the configuration"
                          f"{did_you_mean(key, dotted_keys(reference))}")
    if override.is_add():
        raise ConfigError(f"{override.input_line}: {key} is already set; override it without +: "
                          f"{override.input_line.lstrip('+')}")
    default = OmegaConf.select(reference, key, throw_on_missing=False)
    wanted = expected_type(default)
    if wanted is None or value is None or (isinstance(value, str) and value.startswith("${")):
        return
    fits = isinstance(value, wanted) and not (wanted is int and isinstance(value, bool))
    fits |= wanted is float and isinstance(value, int) and not isinstance(value, bool)
    if not fits:
        if wanted is dict:
            raise ConfigError(f"{override.input_line}: {key} is a section; set one of its keys ({key}.KEY=VALUE)"
                              + (f" or choose another option ({key}=OPTION)" if key in config_groups() else ""))
        shown = OmegaConf.to_yaml({"v": default}).strip().removeprefix("v:").strip().replace("\n", " ")
        raise ConfigError(f"{override.input_line}: {key} takes {TYPE_NAMES[wanted]} (default {shown})")


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return compose(config_name=config_name, overrides=overrides)
        except HydraException as err:
            # what the checks above do not foresee, in Hydra's words (its remedy included), on one line
            raise ConfigError(" ".join(str(err).split())) from err


def compose_config(overrides: list[str] | None = None, config_name: str = SCRIPT_CONFIG) -> DictConfig:
    """Compose conf/<config_name>.yaml with Hydra overrides (`train=long`, `+pair=demo`, `a.b=1`), each checked
    first (ConfigError with the nearest valid names)."""
    overrides = list(overrides or [])
    parsed = parse_overrides(overrides)
    choices = [o for o in parsed if is_group_choice(o)]
    for override in choices:
        check_group_choice(override)
    if len(choices) < len(parsed):
        reference = _compose(config_name, [o.input_line for o in choices])
        for override in parsed:
            if override not in choices:
                check_value(override, reference)
    return _compose(config_name, overrides)


def compose_params_file(path: Path, overrides: list[str]) -> DictConfig:
    """A composed file (params.yaml) with overrides, composed by Hydra as a primary config beside conf/: keys are
    checked as on conf/, and `+group=option` merges conf/<group>/<option>.yaml over the file's values."""
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found ({PARAMS_FLAG} FILE names a composed configuration, "
                          f"e.g. params.yaml)")
    try:
        values = OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a YAML configuration ({' '.join(str(err).split())})") from err
    if not isinstance(values, DictConfig):
        raise ConfigError(f"{path}: not a YAML mapping of configuration keys")
    for override in parse_overrides(overrides):
        if is_group_choice(override) and not override.is_add():
            raise ConfigError(f"{override.input_line}: {path} is composed already, its config groups chosen; choose "
                              f"{override.key_or_group} on conf/ instead (without {PARAMS_FLAG}, or `dvc exp run -S "
                              f"{override.input_line}`)")
    # the file's values first, so that groups added by overrides merge over them
    ConfigStore.instance().store(name=PARAMS_FILE_CONFIG, node=OmegaConf.merge({"defaults": ["_self_"]}, values))
    return compose_config(overrides, PARAMS_FILE_CONFIG)


def load_config(overrides: list[str], params_file: str | Path | None = None) -> DictConfig:
    """Configuration for an entry script: conf/ composed with the overrides, or the composed `params_file`."""
    if params_file is None:
        return compose_config(overrides)
    return compose_params_file(Path(params_file), overrides)


def literal(text: str) -> str:
    """`text` as an OmegaConf string that resolves to itself (a path may hold `${`, which would interpolate)."""
    return re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", text)


def set_pair(cfg: DictConfig, image0: str, image1: str) -> None:
    """Make cfg.pair the two images given on the command line (any path: nothing in it is parsed)."""
    with open_dict(cfg):
        cfg.pair = {"image0": literal(image0), "image1": literal(image1)}


def render_params(cfg: DictConfig) -> str:
    """params.yaml text for a composed config, written exactly as DVC's Hydra composition writes it."""
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def main() -> None:
    """Regenerate params.yaml from conf/pipeline.yaml (run after editing conf/)."""
    write_text(PARAMS_FILE, render_params(compose_config(sys.argv[1:], PIPELINE_CONFIG)))
    print(f"wrote {PARAMS_FILE.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    main()
