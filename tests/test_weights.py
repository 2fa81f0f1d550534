"""Offline-first weight resolution: explicit path, hub cache, package files, download, and the failure message."""

import functools
import http.server
import sys
import threading

import pytest
import torch

from s2match.models import weights
from s2match.models.weights import WeightSource, load_strict, resolve_weights


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub / "checkpoints"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep pytest output clean
        pass


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; yields its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


def _point_to(monkeypatch, name, urls):
    """Make ``name`` resolvable only through ``urls`` (its package does not exist)."""
    source = WeightSource(hub_file=f"{name}.bin", package="s2match_no_such_package", package_file="w.pt", urls=urls)
    monkeypatch.setitem(weights.WEIGHT_SOURCES, name, source)


def test_explicit_path_wins(tmp_path, empty_hub):
    path = tmp_path / "mine.pth"
    path.write_bytes(b"x")
    assert resolve_weights("aliked-n16", str(path)) == path


def test_missing_explicit_path_raises(tmp_path, empty_hub):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights("disk", str(tmp_path / "absent.pth"))


def test_hub_cache_comes_before_package(empty_hub):
    empty_hub.mkdir(parents=True)
    cached = empty_hub / weights.WEIGHT_SOURCES["xfeat"].hub_file
    cached.write_bytes(b"x")
    assert resolve_weights("xfeat") == cached


@pytest.mark.parametrize("name", sorted(weights.WEIGHT_SOURCES))
def test_package_files_found_without_importing(name, empty_hub, monkeypatch):
    source = weights.WEIGHT_SOURCES[name]
    monkeypatch.delitem(sys.modules, source.package, raising=False)
    path = resolve_weights(name)
    assert path.is_file()
    assert source.package in path.parts
    assert source.package not in sys.modules  # found by find_spec, not imported


def test_download_from_kornia_url(local_server, empty_hub, monkeypatch):
    base, served = local_server
    (served / "w.pt").write_bytes(b"weights-bytes")
    _point_to(monkeypatch, "remote", (f"{base}/missing.pt", f"{base}/w.pt"))
    path = resolve_weights("remote")
    assert path == empty_hub / "remote.bin"
    assert path.read_bytes() == b"weights-bytes"


def test_nothing_found_names_every_place(local_server, empty_hub, monkeypatch):
    base, _ = local_server
    urls = (f"{base}/a.pt", f"{base}/b.pt")
    _point_to(monkeypatch, "remote", urls)
    with pytest.raises(FileNotFoundError) as error:
        resolve_weights("remote")
    message = str(error.value)
    for place in (str(empty_hub / "remote.bin"), "s2match_no_such_package", *urls):
        assert place in message


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown weights 'superpoint'"):
        resolve_weights("superpoint")


def test_load_strict_keeps_derived_buffers_and_rejects_extra_keys():
    module = torch.nn.BatchNorm1d(3)
    state = {k: v for k, v in module.state_dict().items() if k != "num_batches_tracked"}
    load_strict(module, state, "mem", derived_buffers=("num_batches_tracked",))
    with pytest.raises(ValueError, match="weights file mem does not fit BatchNorm1d: 1 missing"):
        load_strict(module, state, "mem")
    with pytest.raises(ValueError, match="1 unexpected keys"):
        load_strict(module, {**module.state_dict(), "bogus": torch.zeros(1)}, "mem")
    with pytest.raises(ValueError, match="size mismatch"):
        load_strict(module, {**module.state_dict(), "weight": torch.zeros(4)}, "mem")
