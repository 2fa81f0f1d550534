"""Tiling coverage, alignment by georeference, splits without leakage, a ground truth that holds on the ground:
the warp and the measured shift between the dates."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject

from s2match.data import pairs
from s2match.data import tiling
from s2match.data.dateshift import DateShiftSpec, measure_date_shift
from s2match.geo.homography import warp_image, warp_points
from s2match.data.pairs import load_pair, location_groups, read_tile, season_kind


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    valid = np.isfinite(a) & np.isfinite(b)
    a, b = a[valid] - a[valid].mean(), b[valid] - b[valid].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize(("width", "height", "size", "overlap"), [(1024, 1024, 512, 0), (2618, 3649, 512, 64),
                                                                   (426, 353, 512, 0), (512, 5120, 512, 0)])
def test_tiles_cover_the_whole_grid(width, height, size, overlap):
    spec = tiling.TileSpec(size, overlap, 256, 0.9, 0.01)
    covered = np.zeros((height, width), bool)
    for window in tiling.tile_windows(width, height, spec):
        assert window.col_off + window.width <= width and window.row_off + window.height <= height
        covered[int(window.row_off):int(window.row_off + window.height),
                int(window.col_off):int(window.col_off + window.width)] = True
    assert covered.all()


def test_tiles_are_georeferenced_windows_of_the_scene(stages):
    tiles = stages["tiles"]
    tile = tiles[(tiles.aoi == "ua-T35UNQ") & tiles.kept.astype(bool)].iloc[3]
    scene = stages["scenes"].set_index("scene_id").loc[tile.scene_id]
    with rasterio.open(tile.path) as t, rasterio.open(scene.image) as s:
        window = rasterio.windows.from_bounds(*t.bounds, transform=s.transform)
        np.testing.assert_array_equal(t.read(), s.read(window=window))


def best_shift(a: np.ndarray, b: np.ndarray, radius: int = 8) -> tuple[int, int]:
    """(dy, dx) within `radius` px that maximises the NCC of a and b."""
    def crop(img, dy, dx):
        h, w = img.shape
        return img[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    shifts = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    return max(shifts, key=lambda s: ncc(crop(a, *s), crop(b, -s[0], -s[1])))


def test_jp2_crops_aligned_by_georeference(stages):
    """The two JP2 crops have different extents; on the AOI grid their common tiles show the same ground, up to
    the few-pixel misregistration this AROSICS test case is known for."""
    tiles = stages["tiles"]
    kept = tiles[(tiles.aoi == "t33uuu-crop") & tiles.kept.astype(bool)]
    both = kept.groupby("tile_id").filter(lambda g: len(g) == 2)
    assert both.tile_id.nunique() >= 5
    aligned, shifted, offsets = [], [], []
    for _, group in both.groupby("tile_id"):
        a, b = (read_tile(p)[0] for p in group.path)
        aligned.append(ncc(a, b))
        shifted.append(ncc(a[:, 20:], b[:, :-20]))  # 200 m off: a different place
        offsets.append(np.hypot(*best_shift(a[::2, ::2], b[::2, ::2], radius=4)) * 2)
    assert np.median(aligned) > np.median(shifted) + 0.1
    assert np.median(offsets) <= 3.0


def test_scene_in_another_crs_is_aligned(tmp_path, stages):
    """A scene reprojected to another CRS is read back onto the AOI grid at the same ground."""
    scenes = stages["scenes"].set_index("scene_id")
    src_path = scenes.loc["ua-T36UUA-summer", "image"]
    moved = tmp_path / "moved.tif"
    with rasterio.open(src_path) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:3857", src.width, src.height, *src.bounds)
        profile = {**src.profile, "crs": "EPSG:3857", "transform": transform, "width": width, "height": height}
        with rasterio.open(moved, "w", **profile) as dst:
            reproject(rasterio.band(src, 1), rasterio.band(dst, 1), resampling=Resampling.bilinear)
    spec = tiling.TileSpec(512, 0, 256, 0.5, 0.0)
    members = [{"scene_id": "orig", "image": src_path, "date": "", "season": "summer"},
               {"scene_id": "moved", "image": str(moved), "date": "", "season": "summer"}]
    rows = pd.DataFrame(tiling.tile_aoi("ua", members, spec, tmp_path / "tiles"))
    both = rows[rows.kept].groupby("tile_id").filter(lambda g: len(g) == 2)
    scores = [ncc(*(read_tile(p)[0] for p in g.path)) for _, g in list(both.groupby("tile_id"))[2:5]]
    assert len(scores) == 3 and min(scores) > 0.9


def test_splits_have_no_location_leakage(stages):
    table = stages["pairs"]
    assert set(table.split) == {"train", "val", "test"}
    for location, group in table.groupby("location"):
        assert group.split.nunique() == 1, location
    test_aois = set(table[table.split == "test"].aoi)
    assert {"oscd-paris", "oscd-bercy"} <= test_aois  # neighbours: one location, so Bercy follows Paris


def test_location_groups_and_season_kinds():
    boxes = {"a": (0, 0, 1, 1), "b": (1.005, 0, 2, 1), "c": (5, 5, 6, 6)}
    assert location_groups(boxes, 1.0)["b"] == location_groups(boxes, 1.0)["a"]
    assert location_groups(boxes, 0.1)["b"] != location_groups(boxes, 0.1)["a"]
    assert location_groups(boxes, 1.0)["c"] == "c"
    assert season_kind("summer", "winter") == season_kind("winter", "summer") == "winter-summer"
    assert pairs.season_priority("winter-summer") < pairs.season_priority("spring-summer") < pairs.season_priority(
        "summer-summer")


def test_cross_season_pairs_first(stages):
    table = stages["pairs"]
    ukraine = table[table.aoi == "ua-T35UNQ"]
    assert (ukraine.groupby("tile_id").season_kind.apply(lambda k: (k == "winter-summer").sum()) == 2).all()
    assert table[table.split == "test"].season_kind.str.contains("winter").any()


def patch_scores(row: dict, samples: int = 30) -> tuple[list[float], list[float]]:
    """NCC of 49 px patches around p in image0 and around H(p) in image1 (sampled through H, so the patches are
    in one frame), and of the same patch against image1 30 px away."""
    image0, image1, H = load_pair(row)
    height, width = image1.shape[1:]
    same, elsewhere = [], []
    for x, y in np.random.default_rng(0).uniform(60, min(image0.shape[1:]) - 60, size=(samples, 2)).astype(int):
        grid = np.stack(np.meshgrid(np.arange(x - 24, x + 25), np.arange(y - 24, y + 25)), -1).reshape(-1, 2)
        mapped = warp_points(H, grid.astype(float)).round().astype(int)
        if not ((mapped >= 0).all() and (mapped[:, 0] < width).all() and (mapped[:, 1] < height - 30).all()):
            continue
        patch0 = image0[0, y - 24:y + 25, x - 24:x + 25].ravel()
        same.append(ncc(patch0, image1[0, mapped[:, 1], mapped[:, 0]]))
        elsewhere.append(ncc(patch0, image1[0, mapped[:, 1] + 30, mapped[:, 0]]))
    return same, elsewhere


def test_homography_maps_a_point_to_the_same_ground(stages):
    """Image1 is the second date warped by H, so the ground at p in image0 is at H(p) in image1."""
    table = stages["pairs"]
    row = table[(table.aoi == "ua-T35UNQ") & (table.season_kind == "summer-summer")].iloc[0].to_dict()
    assert not np.allclose(pairs.pair_homography(row), np.eye(3))
    # The same date on both sides (so no shift between the dates): image1 around H(p) is image0 around p.
    same, elsewhere = patch_scores({**row, "path1": row["path0"], "date_shift_x": 0.0, "date_shift_y": 0.0})
    assert len(same) >= 10 and np.median(same) > 0.95 and min(same) > 0.85 and np.median(elsewhere) < 0.6
    # Two summers a year apart: the right place still correlates far better than a wrong one.
    same, elsewhere = patch_scores(row)
    assert np.median(same) > np.median(elsewhere) + 0.3


def test_single_date_aoi_is_skipped(stages, cfg):
    tiles = stages["tiles"].copy()
    lonely = tiles[tiles.aoi == "oscd-rio"].scene_id.iloc[0]
    tiles = tiles[~((tiles.aoi == "oscd-rio") & (tiles.scene_id != lonely))]
    out = stages["dir"] / "pairs-single"
    table = pairs.write_pairs(cfg.pairs, stages["scenes"], tiles, out)
    assert "oscd-rio" not in set(table.aoi)
    assert json.loads((out / "summary.json").read_text())["skipped_aois"] == {"oscd-rio": "single date"}


def displaced(tile: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """The tile with its ground moved by `shift` (x, y) px, cubic resampling."""
    move = np.array([[1, 0, shift[0]], [0, 1, shift[1]], [0, 0, 1]], np.float64)
    return np.stack([warp_image(band, move, (tile.shape[2], tile.shape[1])) for band in tile])


def test_date_shift_recovers_known_shifts_across_seasons(sample_dir, cfg):
    """Winter against summer on real strips: displacing the summer tile by s changes the measured shift by s; the
    same date displaced is measured at s itself."""
    spec = DateShiftSpec(**cfg.pairs.date_shift)
    with rasterio.open(sample_dir / "ukraine/T36UUA/winter.tif") as src:
        winter = src.read(window=rasterio.windows.Window(0, 1400, 512, 512)).astype(np.float32)
    with rasterio.open(sample_dir / "ukraine/T36UUA/summer.tif") as src:
        summer = src.read(window=rasterio.windows.Window(0, 1400, 512, 512)).astype(np.float32)
    base = measure_date_shift(winter, summer, spec)
    assert base.shift is not None and base.agreeing >= spec.min_windows
    for shift in [(0.3, -0.2), (2.6, -1.45)]:
        moved = measure_date_shift(winter, displaced(summer, shift), spec)
        np.testing.assert_allclose(moved.shift - base.shift, shift, atol=0.1)
        np.testing.assert_allclose(measure_date_shift(summer, displaced(summer, shift), spec).shift, shift, atol=0.05)
    flat = np.full_like(summer, 0.2)
    unmeasured = measure_date_shift(summer, flat, spec)
    assert unmeasured.shift is None and unmeasured.reason == "no window has data and edges on both dates"
    cloud = summer.copy()
    cloud[:, :, 200:] = np.random.default_rng(0).uniform(0.3, 0.6, size=cloud[:, :, 200:].shape)
    unmeasured = measure_date_shift(summer, cloud, spec)
    assert unmeasured.shift is None and "windows agree on the shift between the dates" in unmeasured.reason


def test_pair_ground_truth_includes_the_shift_between_the_dates(stages):
    """The sample's two T33UUU dates are known to be about 2 px apart. Their pairs carry that shift, and image1
    resampled by the ground truth lies on image0 to the pixel, which the warp alone does not achieve."""
    table = stages["pairs"]
    jp2 = table[table.aoi == "t33uuu-crop"]
    assert len(jp2) >= 5
    forward = jp2.scene0 < jp2.scene1  # 2016-05-29 -> 2016-06-08; the others are the opposite direction
    shifts = np.where(forward.to_numpy()[:, None], 1, -1) * jp2[["date_shift_x", "date_shift_y"]].to_numpy(float)
    assert np.all(np.abs(shifts - np.median(shifts, axis=0)) < 0.3)
    assert 1.5 < np.hypot(*np.median(shifts, axis=0)) < 2.5
    row = jp2.iloc[0].to_dict()
    image0, image1, truth = load_pair(row)
    for H, expected in ((truth, (0, 0)), (pairs.pair_warp(row), None)):
        rectified = cv2.warpPerspective(image1[0], H, image0.shape[:0:-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                        borderValue=np.nan)
        offset = best_shift(image0[0], rectified, radius=4)
        if expected is None:
            assert offset != (0, 0)
        else:
            assert offset == expected
    assert (jp2.date_shift_from == "tile").sum() >= 5 and set(jp2.date_shift_from) <= {"tile", "aoi"}
    summary = json.loads((stages["dir"] / "pairs" / "summary.json").read_text())
    assert any(key.startswith("t33uuu-crop") for key in summary["date_shift_px"])


def test_a_tile_that_cannot_tell_takes_the_shift_of_its_dates_elsewhere():
    """Unmeasured (cloud): the median of the AOI's tiles of the same dates, in either direction; no tile of
    those dates measured: no shift, the georeference trusted."""
    rows = [{"pair_id": f"p{i}", "aoi": "a", "scene0": s0, "scene1": s1}
            for i, (s0, s1) in enumerate([("d1", "d2"), ("d2", "d1"), ("d1", "d2"), ("d2", "d1"), ("d1", "d3")])]
    measured = {"p0": np.array([0.6, -1.8]), "p1": np.array([-0.7, 1.9]), "p2": np.array([0.6, -1.8])}
    filled = {row["pair_id"]: row for row in pairs.with_date_shifts(rows, measured)}
    assert filled["p0"]["date_shift_from"] == "tile" and filled["p0"]["date_shift_x"] == 0.6
    assert filled["p3"]["date_shift_from"] == "aoi"
    assert (filled["p3"]["date_shift_x"], filled["p3"]["date_shift_y"]) == (-0.6, 1.8)
    assert filled["p4"]["date_shift_from"] == "georeference" and filled["p4"]["date_shift_x"] == 0.0
