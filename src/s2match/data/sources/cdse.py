"""Sentinel-2 from the Copernicus Data Space Ecosystem (CDSE): OData search, SAFE subsets via Nodes.

Only the requested band files, the product metadata (MTD_MSIL1C.xml / MTD_MSIL2A.xml: processing
baseline, radiometric offsets) and the cloud mask (L2A SCL; L1C MSK_CLASSI_B00.jp2, or the
MSK_CLOUDS_B00.gml of older baselines) are downloaded, never the ~1 GB zip, into the SAFE layout:
    <dest>/<PRODUCT>.SAFE/MTD_MSIL2A.xml
    <dest>/<PRODUCT>.SAFE/GRANULE/<granule>/IMG_DATA/R10m/T36UYA_20190115T090321_B04_10m.jp2

Credentials come from CDSE_USERNAME / CDSE_PASSWORD or ~/.netrc and never reach logs or errors.
"""

from __future__ import annotations

import logging
import netrc
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import requests

from s2match.data.sources import DownloadError, Scene, choose_scenes, day_after, season_windows
from s2match.data.sources.aoi import Aoi, parse_aoi
from s2match.data.sources.http import FileJob, HttpError, RetryPolicy, download_all, request
from s2match.s2.naming import S2_BANDS, parse_product_name, product_type_of

log = logging.getLogger(__name__)

USERNAME_ENV, PASSWORD_ENV = "CDSE_USERNAME", "CDSE_PASSWORD"

# Where each L2A band lives at its native resolution (GRANULE/*/IMG_DATA/R<res>m).
L2A_NATIVE_RESOLUTION = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10,
    "B8A": 20, "B09": 60, "B11": 20, "B12": 20, "SCL": 20, "AOT": 10, "WVP": 10, "TCI": 10,
}
L2A_RESOLUTIONS = (10, 20, 60)
L1C_BANDS = frozenset(S2_BANDS) | {"TCI"}
L1C_CLOUD_MASK = "MSK_CLASSI_B00.jp2"  # processing baseline >= 04.00
L1C_CLOUD_MASK_GML = "MSK_CLOUDS_B00.gml"  # older baselines


class CdseAuthError(DownloadError):
    """Missing or refused CDSE credentials."""


@dataclass(frozen=True)
class Credentials:
    username: str = field(repr=False)
    password: str = field(repr=False)


def load_credentials(netrc_machine: str) -> Credentials:
    """CDSE_USERNAME / CDSE_PASSWORD, else the ~/.netrc entry for `netrc_machine`."""
    username, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    if username and password:
        return Credentials(username, password)
    try:
        entry = netrc.netrc().authenticators(netrc_machine)
    except FileNotFoundError:
        entry = None
    except netrc.NetrcParseError as exc:
        # exc.msg can quote the offending token, which may be the password: name the line only.
        raise CdseAuthError(f"~/.netrc: cannot be parsed (line {exc.lineno})") from None
    if entry and entry[0] and entry[2]:
        return Credentials(entry[0], entry[2])
    raise CdseAuthError(
        f"CDSE credentials missing: set {USERNAME_ENV} and {PASSWORD_ENV}, or add "
        f"'machine {netrc_machine} login <user> password <password>' to ~/.netrc"
    )


class TokenAuth:
    """Bearer tokens from the CDSE Keycloak endpoint, renewed before expiry and after a 401.

    Renewal uses the refresh token while it is valid and logs in again otherwise. Thread-safe: the
    download workers share one instance, and a 401 seen by several workers renews only once.
    """

    def __init__(self, credentials: Credentials, token_url: str, client_id: str, policy: RetryPolicy,
                 margin_s: float):
        self._credentials = credentials
        self._token_url = token_url
        self._client_id = client_id
        self._policy = policy
        self._margin_s = margin_s
        self._session = policy.session()
        self._lock = threading.Lock()
        self._access: str | None = None
        self._refresh: str | None = None
        self._access_until = self._refresh_until = 0.0

    def __repr__(self) -> str:
        return "TokenAuth(<redacted>)"

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self._access is None or time.monotonic() >= self._access_until - self._margin_s:
                self._renew()
            return {"Authorization": f"Bearer {self._access}"}

    def refresh(self, rejected: Mapping[str, str]) -> None:
        with self._lock:
            # Another worker may already have replaced the token the server rejected.
            if rejected.get("Authorization") in (None, f"Bearer {self._access}"):
                self._renew()

    def _renew(self) -> None:
        if self._refresh and time.monotonic() < self._refresh_until - self._margin_s:
            try:
                self._token_request({"grant_type": "refresh_token", "refresh_token": self._refresh})
                return
            except CdseAuthError:
                log.info("CDSE refresh token refused; logging in again")
        self._token_request({"grant_type": "password", "username": self._credentials.username,
                             "password": self._credentials.password})

    def _token_request(self, form: dict[str, str]) -> None:
        response = request(self._session, "POST", self._token_url, self._policy,
                           data={"client_id": self._client_id, **form}, accept={400, 401})
        with response:
            if response.status_code in (400, 401):
                raise CdseAuthError(
                    f"{urlsplit(self._token_url).netloc} refused the CDSE login (HTTP {response.status_code}, "
                    f"{_oauth_error(response)}): check {USERNAME_ENV} / {PASSWORD_ENV} or the ~/.netrc entry"
                )
            body = response.json()
        now = time.monotonic()
        self._access = body["access_token"]
        self._access_until = now + float(body.get("expires_in", 600))
        self._refresh = body.get("refresh_token")
        self._refresh_until = now + float(body.get("refresh_expires_in", 0))
        log.debug("CDSE access token renewed (valid %s s)", body.get("expires_in"))


def fetch(cfg, dest: Path) -> list[Path]:
    """Search every season window, pick one scene each, download their SAFE subsets to `dest`.

    Returns the product folders (<dest>/<PRODUCT>.SAFE) in season order, each once.
    """
    dest = Path(dest)
    credentials = load_credentials(cfg.api.netrc_machine)  # fail before a long search, not after
    aoi = parse_aoi(cfg.aoi, cfg.get("tile"))
    policy = RetryPolicy.from_cfg(cfg)
    session = policy.session()
    chosen = choose_scenes(search(cfg, aoi, session, policy))
    auth = TokenAuth(credentials, cfg.api.token_url, cfg.api.client_id, policy, float(cfg.token_margin_s))
    scenes = list({scene.id: scene for scene in chosen.values()}.values())
    jobs = [job for scene in scenes for job in plan_product(cfg, scene, dest, session, auth, policy)]
    download_all(jobs, policy, max_workers=int(cfg.max_workers), auth=auth,
                 trusted_domains=list(cfg.api.auth_domains))
    return [dest / safe_folder(scene.name) for scene in scenes]


def search(cfg, aoi: Aoi, session: requests.Session, policy: RetryPolicy) -> dict[str, list[Scene]]:
    """{season: candidate scenes} from the OData catalogue, following @odata.nextLink paging."""
    wanted_type = product_type_of(cfg.level)
    candidates = {}
    for season, (first, last) in season_windows(cfg.seasons).items():
        clauses = [
            "Collection/Name eq 'SENTINEL-2'",
            _attribute("String", "productType", "eq", f"'{wanted_type}'"),
            _attribute("Double", "cloudCover", "le", f"{float(cfg.max_cloud):.2f}"),
            f"ContentDate/Start ge {first.isoformat()}T00:00:00.000Z",
            f"ContentDate/Start lt {day_after(last).isoformat()}T00:00:00.000Z",
        ]
        if aoi.tile:
            clauses.append(_attribute("String", "tileId", "eq", f"'{aoi.tile}'"))
        if aoi.bbox:
            clauses.append(f"OData.CSC.Intersects(area=geography'SRID=4326;{aoi.wkt()}')")
        params = {"$filter": " and ".join(clauses), "$orderby": "ContentDate/Start asc",
                  "$top": int(cfg.page_size), "$expand": "Attributes"}
        products = _odata_pages(session, f"{cfg.api.odata_url}/Products", params, policy)
        scenes = [_scene(product, season) for product in products]
        candidates[season] = [s for s in scenes if aoi.tile is None or s.tile == aoi.tile]
        log.info("%s %s..%s: %d candidate products", season, first, last, len(candidates[season]))
    return candidates


def plan_product(cfg, scene: Scene, dest: Path, session: requests.Session, auth: TokenAuth,
                 policy: RetryPolicy) -> list[FileJob]:
    """The files of one product to fetch through the Nodes API, with their local SAFE paths."""
    level = str(cfg.level).upper()
    nodes = _NodeTree(f"{cfg.api.download_url}/Products({scene.id})/Nodes({scene.name})", session, auth,
                      policy, list(cfg.api.auth_domains), dest / safe_folder(scene.name), scene.name)
    wanted = [(nodes.match((), "MTD_MSIL2A.xml" if level == "L2A" else "MTD_MSIL1C.xml"),)]
    granule = _pick_granule(nodes.names(("GRANULE",)), scene)
    bands = [str(b).upper() for b in cfg.bands]
    if level == "L2A":
        if cfg.mask and "SCL" not in bands:
            bands.append("SCL")
        for band in bands:
            band_id, resolution = _l2a_band(band)
            folder = ("GRANULE", granule, "IMG_DATA", f"R{resolution}m")
            wanted.append(folder + (nodes.match(folder, f"_{band_id}_{resolution}m.jp2"),))
    else:
        for band in bands:
            if band not in L1C_BANDS:
                raise ValueError(f"bands: {band!r} is not an L1C band ({', '.join(sorted(L1C_BANDS))})")
            folder = ("GRANULE", granule, "IMG_DATA")
            wanted.append(folder + (nodes.match(folder, f"_{band}.jp2"),))
        if cfg.mask:
            qi = ("GRANULE", granule, "QI_DATA")
            names = nodes.names(qi)
            mask = L1C_CLOUD_MASK if L1C_CLOUD_MASK in names else nodes.match(qi, L1C_CLOUD_MASK_GML)
            wanted.append(qi + (mask,))
    return [nodes.job(parts) for parts in wanted]


def safe_folder(name: str) -> str:
    return name if name.endswith(".SAFE") else f"{name}.SAFE"


class _NodeTree:
    """Lazily listed folders of one product in the OData Nodes API."""

    def __init__(self, root_url, session, auth, policy, trusted_domains, local_root: Path, product: str):
        self._root_url, self._session, self._auth = root_url, session, auth
        self._policy, self._trusted = policy, trusted_domains
        self._local_root, self._product = local_root, product
        self._listings: dict[tuple[str, ...], dict[str, dict]] = {}

    def names(self, folder: tuple[str, ...]) -> dict[str, dict]:
        if folder not in self._listings:
            url = self._url(folder) + "/Nodes"
            response = request(self._session, "GET", url, self._policy, auth=self._auth,
                               trusted_domains=self._trusted)
            with response:
                body = response.json()
            # CDSE answers {"result": [...]}; plain OData services use "value".
            entries = body.get("result", body.get("value", []))
            self._listings[folder] = {entry["Name"]: entry for entry in entries}
        return self._listings[folder]

    def match(self, folder: tuple[str, ...], suffix: str) -> str:
        names = [n for n in self.names(folder) if n.endswith(suffix)]
        if len(names) != 1:
            where = "/".join((self._product,) + folder)
            raise DownloadError(f"{where}: expected one file ending in {suffix}, found {sorted(names) or 'none'}")
        return names[0]

    def job(self, parts: tuple[str, ...]) -> FileJob:
        entry = self.names(parts[:-1])[parts[-1]]
        size = entry.get("ContentLength")
        return FileJob(url=self._url(parts) + "/$value", path=self._local_root.joinpath(*parts),
                       size=int(size) if size else None)

    def _url(self, parts: tuple[str, ...]) -> str:
        return self._root_url + "".join(f"/Nodes({p})" for p in parts)


def _pick_granule(granules: Mapping[str, dict], scene: Scene) -> str:
    # Products before late 2016 may hold several tiles' granules; the tile code picks ours.
    names = list(granules) if len(granules) == 1 else [g for g in granules if f"_T{scene.tile}_" in g]
    if len(names) != 1:
        raise DownloadError(f"{scene.name}: cannot tell the granule of tile {scene.tile} among {sorted(granules)}")
    return names[0]


def _l2a_band(band: str) -> tuple[str, int]:
    """'B8A' -> ('B8A', 20) at its native resolution; 'B04_20m' -> ('B04', 20)."""
    band_id, _, resolution = band.partition("_")
    if band_id not in L2A_NATIVE_RESOLUTION:
        raise ValueError(f"bands: {band!r} is not an L2A band ({', '.join(sorted(L2A_NATIVE_RESOLUTION))})")
    if not resolution:
        return band_id, L2A_NATIVE_RESOLUTION[band_id]
    metres = int(resolution.removesuffix("M")) if resolution.removesuffix("M").isdigit() else None
    if metres not in L2A_RESOLUTIONS or metres < L2A_NATIVE_RESOLUTION[band_id]:
        raise ValueError(f"bands: {band!r}: {band_id} exists at {[r for r in L2A_RESOLUTIONS if r >= L2A_NATIVE_RESOLUTION[band_id]]} m")
    return band_id, metres


def _scene(product: Mapping, season: str) -> Scene:
    name = product["Name"]
    parsed = parse_product_name(name)
    attributes = {a["Name"]: a.get("Value") for a in product.get("Attributes", [])}
    orbit = attributes.get("relativeOrbitNumber") or (parsed and parsed.relative_orbit)
    return Scene(
        id=product["Id"],
        name=name,
        season=season,
        tile=attributes.get("tileId") or (parsed and parsed.tile),
        relative_orbit=int(orbit) if orbit else None,
        cloud_cover=float(attributes.get("cloudCover", 100.0)),
        sensed=datetime.fromisoformat(product["ContentDate"]["Start"]),
        processing_baseline=parsed.processing_baseline if parsed else None,
        record=product,
    )


def _odata_pages(session, url: str, params: dict | None, policy: RetryPolicy) -> list[dict]:
    products, seen = [], set()
    while url:
        response = request(session, "GET", url, policy, params=params)
        with response:
            page = response.json()
        products.extend(page.get("value", []))
        url, params = page.get("@odata.nextLink"), None  # the next link already carries the query
        if url in seen:
            raise HttpError(f"OData paging loops at {url.split('?', 1)[0]}")
        seen.add(url)
    return products


def _attribute(kind: str, name: str, op: str, value: str) -> str:
    return (f"Attributes/OData.CSC.{kind}Attribute/any(att:att/Name eq '{name}' "
            f"and att/OData.CSC.{kind}Attribute/Value {op} {value})")


def _oauth_error(response: requests.Response) -> str:
    """Only the OAuth error code: the body is the server's, and never echoed whole."""
    try:
        return str(response.json().get("error", "no error code"))
    except ValueError:
        return "no error code"
