"""Time-series co-registration (src/coregister.py, s2match.timeseries) on stacks built from real sample scenes.

Each date is a real scene cropped to 384 px, its content shifted by a known amount on its original georeference
(s2match.timeseries.synthetic): the co-registration must find the shifts. Matching is SIFT with the ratio test (no
network) so that each test takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from distributed import Client, LocalCluster
from mlflow.tracking import MlflowClient
from omegaconf import open_dict
from rasterio.windows import Window

from s2match import cli
from s2match.config import PROJECT_ROOT, compose_config
from s2match.timeseries.graph import Edge, EdgeResult, Reliability, plan_edges, solve
from s2match.timeseries.run import coregister
from s2match.timeseries.synthetic import centre_error, shifted, shifted_date, write_dated

SAMPLE = PROJECT_ROOT / "data" / "sample"
T36UYA = SAMPLE / "t36uya_overview"
CROP = Window(400, 300, 384, 384)
FAST = ["features=sift", "features.max_keypoints=1024", "matcher=ratio", "coregister.cog_block_px=256"]
# Five real dates of one summer with a known shift each (x, y px): sub-pixel and a few.
SHIFTS = {"20190815": (2.6, 1.2), "20190825": (-0.8, 0.15), "20190830": (0.0, 0.0), "20190904": (-3.1, -2.4),
          "20190909": (0.55, 0.7)}
TOLERANCE_PX = 0.2


def t36uya_date(folder: Path, day: str, shift: tuple[float, float], name: str | None = None) -> Path:
    """A 384 px crop of the T36UYA overview of `day`, its content shifted by `shift` px."""
    return shifted_date(T36UYA / f"{day}.tif", CROP, shift, folder / (name or f"{day}.tif"), day)


def compose(tmp_path: Path, files: list[Path], *overrides: str):
    cfg = compose_config([f"coregister.output_dir={tmp_path / 'out'}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                          f"mlflow.artifact_location={tmp_path / 'mlruns'}", *FAST, *overrides])
    with open_dict(cfg):
        cfg.stack = {"name": "test", "files": [str(f) for f in files]}
    return cfg


def run_stack(tmp_path: Path, files: list[Path], *overrides: str) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    assert coregister(compose(tmp_path, files, *overrides)) == 0
    out = tmp_path / "out"
    return (json.loads((out / "summary.json").read_text()), pd.read_csv(out / "report" / "shifts.csv"),
            pd.read_csv(out / "report" / "edges.csv"))


def assert_cog_on_grid(path: Path, reference: Path) -> None:
    """A valid COG (GDAL's COG layout, tiled, with overviews) on the reference's grid, with data."""
    with rasterio.open(path) as cog, rasterio.open(reference) as ref:
        assert cog.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert cog.profile["tiled"] and cog.block_shapes[0] == (256, 256)
        assert cog.overviews(1), "a 384 px COG with 256 px blocks has an overview"
        assert (cog.crs, cog.transform, cog.shape) == (ref.crs, ref.transform, ref.shape)
        assert np.isfinite(cog.read(1)).mean() > 0.9


@pytest.fixture(scope="module")
def summer_stack(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("summer")
    return [t36uya_date(folder, day, shift) for day, shift in SHIFTS.items()]


@pytest.fixture
def cluster():
    """Two in-process workers started and closed by the test; the run joins them by address."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as local:
        yield local


def test_known_shifts_of_five_real_dates_recovered_on_a_two_worker_cluster(tmp_path, summer_stack, cluster):
    summary, table, edges = run_stack(tmp_path, summer_stack, f"coregister.scheduler={cluster.scheduler_address}")
    reference = summary["reference"]
    assert summary["dates"] == 5 and summary["dates_failed"] == summary["dates_skipped"] == 0
    ref_shift = np.array(SHIFTS[reference.replace("-", "")])
    for row in table.to_dict("records"):
        truth = tuple(np.array(SHIFTS[row["date"].replace("-", "")]) - ref_shift)
        assert centre_error(row["homography"], truth, (384, 384)) < TOLERANCE_PX, row
        assert row["status"] in ("reference", "direct", "chain")
        assert_cog_on_grid(tmp_path / "out" / row["output"], summer_stack[0])
    # each worker built its pipeline once and used it for every pair it registered
    assert edges.groupby("worker")["pipeline"].nunique().eq(1).all() and edges["worker"].nunique() == 2
    report = tmp_path / "out" / "report"
    assert (report / "shifts.png").stat().st_size > 0 and "2019-08-30_after.png" in (report / "index.html").read_text()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("s2match-coregister").experiment_id])
    assert run.data.metrics["dates_direct"] + run.data.metrics["dates_chain"] == 4


def ukraine_crops() -> tuple[np.ndarray, np.ndarray, rasterio.Affine, rasterio.crs.CRS]:
    """Winter and summer of the T36UUA strip (grey, each stretched to 1..255 on its own), one 384 px crop on one
    grid."""
    window = Window(64, 1152, 384, 384)
    seasons = []
    for season in ("winter", "summer"):
        with rasterio.open(SAMPLE / "ukraine" / "T36UUA" / f"{season}.tif") as src:
            grey = src.read(window=window).astype(np.float32).mean(axis=0)
            transform, crs = src.window_transform(window), src.crs
        low, high = np.percentile(grey, [1, 99])
        seasons.append(np.clip((grey - low) / (high - low) * 254 + 1, 1, 255))
    return seasons[0], seasons[1], transform, crs


def test_winter_date_reaches_the_summer_reference_through_spring(tmp_path):
    """Snow against summer fails directly (the matcher finds no match; windows on a grid placed by the georeference
    give a transform too imprecise to rely on: 24 tie points, 0.1 px); a spring date, snow still on two quadrants
    (the real winter scene there, the real summer one on the other two), matches both, and the chain summer >
    spring > winter is used. Thresholds for 384 px crops: 20 tie points (the estimator's own minimum), 0.05 px."""
    winter, summer, transform, crs = ukraine_crops()
    rows, cols = np.indices(winter.shape)
    spring = np.where((rows < 192) == (cols < 192), winter, summer)
    shifts = {"winter": (1.3, -0.7), "spring": (-0.4, 0.6)}
    files = [write_dated(tmp_path / "in" / "summer.tif", summer, transform, crs, "20190715"),
             write_dated(tmp_path / "in" / "spring.tif", shifted(spring, shifts["spring"]), transform, crs, "20190410"),
             write_dated(tmp_path / "in" / "winter.tif", shifted(winter, shifts["winter"]), transform, crs, "20190120")]
    summary, table, edges = run_stack(tmp_path, files, "coregister.reference=2019-07-15", "coregister.scheduler=none",
                                      "coregister.min_inliers=20", "coregister.max_sigma_px=0.05")
    rows = table.set_index("date")
    direct = edges[(edges["source"] == "2019-07-15") & (edges["target"] == "2019-01-20")].iloc[0]
    assert not direct["reliable"], "snow against summer must fail directly for this test to mean anything"
    assert rows.loc["2019-01-20", "status"] == "chain"
    assert rows.loc["2019-01-20", "route"] == "2019-07-15 > 2019-04-10 > 2019-01-20"
    assert rows.loc["2019-01-20", "reason"].startswith(("direct registration failed", "direct registration weak"))
    assert summary["dates_chain"] == 1 and summary["dates_direct"] == 1
    # by construction the chain carries the winter shift (the real winter and summer scenes are taken as aligned)
    assert centre_error(rows.loc["2019-01-20", "homography"], shifts["winter"], (384, 384)) < TOLERANCE_PX
    assert "2019-07-15 &gt; 2019-04-10 &gt; 2019-01-20" in (tmp_path / "out" / "report" / "index.html").read_text()


def corrupt_tiles(path: Path) -> None:
    """Garbage over every compressed tile (GDAL tells where they lie); the header stays readable, the data not."""
    with rasterio.open(path) as src:
        tiles = [(int(src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1)),
                  int(src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1)))
                 for row in range(-(-src.height // 128)) for col in range(-(-src.width // 128))]
    data = bytearray(path.read_bytes())
    for offset, size in tiles:
        data[offset: offset + size] = b"\xff" * size
    path.write_bytes(bytes(data))


def test_a_task_that_keeps_raising_is_retried_and_its_date_reported(tmp_path, summer_stack, cluster):
    broken = t36uya_date(tmp_path / "in", "20190815", (0.0, 0.0), name="broken.tif")
    with rasterio.open(broken, "r+") as dst:
        dst.update_tags(DATE="20190820")
    corrupt_tiles(broken)
    files = summer_stack[:3] + [broken]
    summary, table, _ = run_stack(tmp_path, files, f"coregister.scheduler={cluster.scheduler_address}",
                                  "coregister.retries=1")
    rows = table.set_index("date")
    assert rows.loc["2019-08-20", "status"] == "failed"
    assert "failed 2 time(s)" in rows.loc["2019-08-20", "reason"] and "unreadable" in rows.loc["2019-08-20", "reason"]
    assert summary["dates_failed"] == 1 and summary["dates_direct"] == 2
    for row in table[table["status"] != "failed"].to_dict("records"):
        assert_cog_on_grid(tmp_path / "out" / row["output"], summer_stack[0])


def test_a_worker_killed_mid_run_is_replaced_and_its_pair_registered_again(tmp_path, summer_stack):
    """Two worker processes; the one registering a pair is killed (SIGKILL): Dask restarts it and runs the pair
    again, and every date comes out registered, its COG valid."""
    killed = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local, \
            Client(local) as watcher:
        pids = watcher.run(os.getpid)

        def kill_a_registering_worker() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                for worker, keys in watcher.processing().items():
                    busy = [key for key in keys if str(key).startswith("register-")]
                    if busy and worker in pids:
                        killed.update(worker=worker, key=str(busy[0]))
                        os.kill(pids[worker], signal.SIGKILL)
                        return
                time.sleep(0.05)

        thread = threading.Thread(target=kill_a_registering_worker)
        thread.start()
        summary, table, edges = run_stack(tmp_path, summer_stack, f"coregister.scheduler={local.scheduler_address}",
                                          "coregister.reference=2019-08-30")
        thread.join()
    assert killed, "no registration was seen running"
    assert summary["dates_direct"] + summary["dates_chain"] == 4 and summary["dates_failed"] == 0
    source, target = killed["key"].split("-", 1)[1].rsplit("-", 1)[0].split("__")
    rerun = edges[(edges["source"] == source) & (edges["target"] == target)].iloc[0]
    assert rerun["success"] and rerun["worker"] != killed["worker"]
    for row in table.to_dict("records"):
        assert_cog_on_grid(tmp_path / "out" / row["output"], summer_stack[0])


def test_a_cloudy_date_is_skipped_with_its_reason(tmp_path, summer_stack):
    """A loose L2A-style product (ESA names) whose SCL says 90 % cloud over the AOI."""
    band = t36uya_date(tmp_path / "cloudy", "20190830", (0.7, 0.2), name="T36UYA_20190827T085601_B04.tif")
    with rasterio.open(band) as src:
        profile = dict(driver="GTiff", dtype="uint8", count=1, width=src.width, height=src.height, crs=src.crs,
                       transform=src.transform)
    scl = np.full((384, 384), 4, np.uint8)
    scl[:, : int(384 * 0.9)] = 9  # cloud, high probability
    with rasterio.open(band.with_name("T36UYA_20190827T085601_SCL.tif"), "w", **profile) as dst:
        dst.write(scl[None])
    summary, table, _ = run_stack(tmp_path, [summer_stack[1], summer_stack[2], band], "coregister.scheduler=none")
    row = table.set_index("date").loc["2019-08-27"]
    assert row["status"] == "skipped" and row["reason"].startswith("too cloudy over the AOI: 10% clear")
    assert "90% cloud (SCL)" in row["reason"] and row["cloud_mask"].endswith("_SCL.tif")
    assert summary["dates_skipped"] == 1 and summary["dates_direct"] == 1


def test_a_stack_of_one_date_is_a_one_line_error(tmp_path, summer_stack, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["coregister.py", "+stack.name=one", f"+stack.files=[{summer_stack[0]}]",
                                      f"coregister.output_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as exit_:
        cli.run(coregister)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == f"error: a stack needs at least 2 dates to co-register, got 1 ({summer_stack[0]})\n"
    assert not (tmp_path / "out").exists()


def translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def test_graph_plans_the_star_and_the_neighbours_once():
    names = ["d1", "d2", "d3", "d4"]
    edges = plan_edges(names, "d3", neighbours=1)
    assert [(e.source, e.target, e.kind) for e in edges] == [
        ("d3", "d1", "reference"), ("d3", "d2", "reference"), ("d3", "d4", "reference"), ("d1", "d2", "neighbour")]
    assert len(plan_edges(names, "d3", neighbours=2)) == 3 + 2  # d1-d2, d2-d4 (d1-d3, d2-d3, d3-d4 are star edges)


def test_graph_routes_direct_chain_or_failed_and_composes_hops_either_way():
    rules = Reliability(min_inliers=30, max_sigma_px=0.2, hop_sigma_px=0.05)

    def result(source, target, H, inliers=100, sigma=0.05):
        return EdgeResult(Edge(source, target, "x"), True, "", H, inliers, 0.1, sigma)

    # truth: date d is shifted by (d, -d) px from the reference r
    results = [result("r", "a", translation(1, -1)), result("r", "b", translation(2, -2), inliers=12),
               result("a", "b", translation(1, -1)), result("c", "b", translation(-1, 1)),  # c -> b, taken backwards
               result("r", "c", translation(3, -3), sigma=0.9), result("r", "e", translation(5, 5), inliers=5)]
    routes = solve(["r", "a", "b", "c", "e"], "r", results, rules, np.array([[10.0, 10.0]]))
    assert routes["a"].status == "direct" and routes["a"].path == ["r", "a"]
    assert routes["b"].status == "chain" and routes["b"].path == ["r", "a", "b"]
    assert routes["b"].reason.startswith("direct registration weak: 12 tie points")
    np.testing.assert_allclose(routes["b"].H, translation(2, -2))
    assert routes["c"].path == ["r", "a", "b", "c"] and "precision 0.900 px" in routes["c"].reason
    np.testing.assert_allclose(routes["c"].H, translation(3, -3))
    assert routes["c"].sigma_px == pytest.approx(np.sqrt(3 * (0.05**2 + 0.05**2)))
    assert routes["e"].status == "failed" and "no chain of reliable registrations" in routes["e"].reason
    assert routes["r"].status == "reference" and np.isnan(routes["a"].closure_px)  # r > b is weak: no other route
    # with r > b reliable, `a` has a second route r > b > a: the closure compares the two at the centre
    twin = solve(["r", "a", "b"], "r", [results[0], result("r", "b", translation(2.1, -2)), results[2]], rules,
                 np.array([[10.0, 10.0]]))
    assert twin["a"].closure_px == pytest.approx(0.1)
