"""`report.html` of a registration run: one self-contained page (pictures embedded as data URIs) with the numbers
of result.json in tables, the inputs, the warnings and the configuration, to open in a browser or attach."""

from __future__ import annotations

import base64
from pathlib import Path

import cv2
from jinja2 import Environment
from omegaconf import OmegaConf

JPEG_QUALITY = 85
# The pictures of a run, in the order the report shows them, with what each shows.
PICTURES = {
    "matches.png": "Matches of the matcher (green: inliers of the matcher's fit, red: outliers; a random subset).",
    "overlay.png": "Image1 resampled onto image0 by the transform: where they agree, edges run on across the "
                   "squares of the checkerboard and across the seam of the swipe; full-resolution windows around "
                   "tie points (red/cyan fringes show offsets); the residual field of the fit's tie points.",
    "keypoints.png": "Keypoints of both images, and the tiles matched at full resolution (cyan).",
}
# Other files of a run, listed (linked) when present.
FILES = {
    "result.json": "every number of this report",
    "matches.csv": "matcher matches: pixels, map coords, shift (m), score, inlier, residual",
    "tie_points.csv": "refined tie points: pixels, map coords, shift (m), quality, status, residual",
    "matches.geojson": "matcher matches as lines image0 -> image1 (GIS)",
    "tie_points.geojson": "refined tie points as lines image0 -> image1 (GIS)",
    "regions.geojson": "shift of image1 per region, as polygons (GIS)",
    "shifts_by_region.csv": "shift of image1 per region",
    "gcps.vrt": "image1 with the tie points as GCPs: gdalwarp gcps.vrt out.tif",
    "gcps.points": "the GCPs for the QGIS georeferencer",
    "coregistered.tif": "image1 resampled onto image0's grid",
}

TEMPLATE = """{% macro table(rows) %}<table>{% for key, value in rows %}<tr><th>{{ key }}</th><td{% if value is number %} class="num"{% endif %}>{{ fmt(value) }}</td></tr>{% endfor %}</table>{% endmacro %}
{% macro grid(rows) %}<table><tr>{% for key in rows[0] %}<th>{{ key }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for value in row.values() %}<td{% if value is number %} class="num"{% endif %}>{{ fmt(value) }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endmacro %}
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>s2match: {{ title }}</title>
<style>
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { font-weight: bold; padding: 0.2em 0.6em; border-radius: 4px; color: white; }
.ok { background: #2e7d32; } .failed { background: #c62828; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em 1em; margin: 0.5em 0; }
.tables { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; } h3 { font-size: 1em; margin: 0.6em 0 0.2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; margin-top: 0.3em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
</style>
</head>
<body>
<h1>s2match registration: {{ title }}
 <span class="status {{ 'ok' if result.success else 'failed' }}">{{ 'registered' if result.success else 'failed' }}</span></h1>
{% for warning in result.warnings %}<div class="warning">Warning: {{ warning }}</div>
{% endfor %}
<h2>Result</h2>
<div class="tables">{% for name, rows in summary.items() %}<div><h3>{{ name }}</h3>{{ table(rows) }}</div>{% endfor %}</div>
{% if result.homography %}<p>Homography image0 px &rarr; image1 px (OpenCV pixel convention):</p>
<pre>{{ homography }}</pre>{% endif %}
{% for picture in pictures %}<figure><a href="{{ picture.name }}"><img src="{{ picture.src }}" alt="{{ picture.name }}"></a>
<figcaption><b>{{ picture.name }}</b>: {{ picture.caption }}</figcaption></figure>
{% endfor %}
{% if regions %}<h2>Shift of image1 per region (m, east / north)</h2>{{ grid(regions) }}{% endif %}
<h2>Inputs</h2>
{{ grid(inputs) }}
<h2>Model</h2>
{{ table(model) }}
{% if tiles %}<h2>Full-resolution tiles</h2>{{ grid(tiles) }}{% endif %}
<h2>Timings (s)</h2>
{{ table(timings) }}
<h2>Files of this run</h2>
<ul>{% for name, what in files %}<li><a href="{{ name }}">{{ name }}</a>: {{ what }}</li>{% endfor %}</ul>
<h2>Configuration</h2>
<pre>{{ config }}</pre>
</body>
</html>
"""


def fmt(value) -> str:
    """A value as the report shows it: floats to 4 significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def run_warnings(result: dict) -> list[str]:
    """What a user of the run must know: pretrained weights standing in for a missing trained head, a failed
    stage that another one replaced, no transform."""
    warnings = []
    model, config = result.get("model", {}), result.get("config", {})
    configured = config.get("matcher", {}).get("weights")
    if model.get("weights") == "pretrained" and configured not in (None, "pretrained"):
        warnings.append(f"the trained LightGlue head {configured} was not found: the pretrained "
                        f"{model.get('features', '')} LightGlue stood in (train one with `dvc repro train`)")
    coarse = result.get("coarse", {})
    if coarse and not coarse.get("success") and result.get("prior"):
        warnings.append(f"coarse matching failed ({coarse.get('reason')}); the fine stage followed the "
                        "georeference")
    refinement = result.get("refinement", {})
    if refinement and not refinement.get("used"):
        warnings.append(f"refinement not used ({refinement.get('reason')}): the transform rests on the matches")
    if not result["success"]:
        warnings.append(f"no transform: {result['reason']}")
    return warnings


def _flatten(prefix: str, value) -> list[tuple[str, object]]:
    """Rows (name, value) of a nested dict, names joined by spaces."""
    if isinstance(value, dict):
        return [row for key, item in value.items() for row in _flatten(f"{prefix}{key} ", item)]
    return [(prefix.strip(), value)]


def summary_tables(result: dict) -> dict[str, list[tuple[str, object]]]:
    """The headline numbers in small tables: the fit, each stage's counts, the shift of image1 and the GCPs."""
    fit: list[tuple[str, object]] = [("success", result["success"])]
    if result["success"]:
        fit += [("fitted on", f"{result['inliers']} {result['fitted_on']}")]
        fit += _flatten("residual (px) ", result["residuals_px"])
    else:
        fit.append(("reason", result["reason"]))
    stages = [(f"{name} {key}", value) for name in ("coarse", "matcher", "refinement")
              for key, value in result.get(name, {}).items()
              if key not in ("homography", "reason") and not isinstance(value, (dict, list))]
    tables = {"Fit": fit, "Stages": stages}
    shift = [row for key in ("shift_m", "shift_px") if key in result for row in _flatten(f"{key} ", result[key])]
    if "correction_px_at_centre" in result:
        shift.append(("correction_px_at_centre", result["correction_px_at_centre"]))
    if shift:
        tables["Shift of image1 from its georeference"] = shift
    if "gcps" in result:
        tables["GCPs"] = _flatten("", result["gcps"])
    return tables


def jpeg_bytes(png: Path) -> bytes:
    """A picture JPEG-encoded: satellite imagery makes PNGs of megabytes, and the report (or a notebook) should stay
    small enough to attach; the PNGs beside it keep every pixel."""
    ok, jpeg = cv2.imencode(".jpg", cv2.imread(str(png), cv2.IMREAD_COLOR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"{png}: cannot encode the picture as JPEG")
    return jpeg.tobytes()


def embedded(png: Path) -> str:
    """A picture as a JPEG data URI."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(png)).decode("ascii")


def write_report(folder: Path, result: dict) -> Path:
    """report.html in `folder`, from result.json's dict and the pictures already in the folder."""
    pictures = [{"name": name, "caption": caption, "src": embedded(folder / name)}
                for name, caption in PICTURES.items() if (folder / name).is_file()]
    images = [{"image": f"image{i}", **{key: value for key, value in image.items() if key != "transform"}}
              for i, image in enumerate(result["images"])]
    columns = dict.fromkeys(key for image in images for key in image)
    inputs = [{key: image.get(key) for key in columns} for image in images]
    per_tile = result.get("tiles", {}).get("per_tile", [])
    environment = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    environment.globals["fmt"] = fmt
    names = " vs ".join(Path(image["name"]).name for image in result["images"])
    html = environment.from_string(TEMPLATE).render(
        title=result.get("config", {}).get("pair", {}).get("name") or names, result=result,
        summary=summary_tables(result), pictures=pictures, inputs=inputs,
        homography="\n".join("  ".join(f"{v: .6e}" for v in row) for row in result.get("homography") or []),
        regions=result.get("shift_m_by_region", []), tiles=per_tile, model=list(result.get("model", {}).items()),
        timings=list(result.get("timings", {}).items()),
        files=[(name, what) for name, what in FILES.items() if (folder / name).is_file() or name == "result.json"],
        config=OmegaConf.to_yaml(OmegaConf.create(result["config"])) if result.get("config") else "-")
    path = folder / "report.html"
    path.write_text(html)
    return path
