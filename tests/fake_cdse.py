"""A local stand-in for the Copernicus Data Space and Earth Search APIs, for offline tests.

One ThreadingHTTPServer on 127.0.0.1 (random free port) speaks, with the real response shapes:
  POST /auth/token                          Keycloak token endpoint (password / refresh_token grants)
  GET  /odata/v1/Products?$filter=...       OData search, {"value": [...], "@odata.nextLink": ...}
  GET  /odata/v1/Products(id)/Nodes(..)/Nodes   Nodes listing, {"result": [...]}
  GET  /odata/v1/Products(id)/Nodes(..)/$value  307 redirect to /zipper/..., which serves the bytes
  GET  /stac                                 STAC API landing page (conformance classes, search links)
  POST /stac/search                          STAC item search with rel=next POST paging
  GET|HEAD /files/<name>                     static files (GeoTIFFs) with Range support
Faults can be queued per file name or "stac/search" (429, 503, truncate; drop: hang up before answering; stall: answer
after `stall_s`) and tokens can be made to expire after a number of uses, so the client's retry /
resume / refresh paths are exercised for real.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import threading
import time
from collections import defaultdict, deque
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

USERNAME = "alice@example.org"
PASSWORD = "Sup3r-Secret-Pa55"
CLIENT_ID = "cdse-public"

_NODE_PATH = re.compile(r"^/(odata/v1|zipper)/Products\(([^)]+)\)((?:/Nodes\([^)]+\))*)(/Nodes|/\$value)$")


class FakeCopernicus:
    def __init__(self):
        self.products: list[dict] = []  # OData product records
        self.trees: dict[str, dict[str, bytes]] = {}  # product id -> {"A.SAFE/GRANULE/g/...": bytes}
        self.listed_size: dict[str, int] = {}  # file name -> ContentLength to announce instead
        self.faults: dict[str, deque] = defaultdict(deque)  # file name -> 429|503|truncate|drop|stall
        self.stac_items: list[dict] = []
        self.static: dict[str, bytes] = {}
        self.token_max_uses: int | None = None  # an access token answers 401 after this many uses
        self.expires_in = 600
        self.value_delay_s = 0.0
        self.stall_s = 0.0
        self.grants: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (method, path with query)
        self.range_requests: list[str] = []
        self.bytes_served: dict[str, int] = defaultdict(int)
        self.active = self.max_active = 0
        self._tokens: dict[str, int] = {}  # access token -> uses
        self._refresh_tokens: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeCopernicus:
        fake = self

        class Handler(_Handler):
            server_state = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- content ---------------------------------------------------------------------------------
    def add_product(self, product_id: str, name: str, start: str, cloud: float, files: dict[str, bytes],
                    product_type: str = "S2MSI2A") -> None:
        """A product whose SAFE tree holds `files` (paths relative to <name>)."""
        _, orbit, tile = re.search(r"_N(\d{4})_R(\d{3})_T(\w{5})_", name).groups()
        self.products.append({
            "@odata.mediaContentType": "application/octet-stream",
            "Id": product_id, "Name": name, "ContentType": "application/octet-stream",
            "ContentLength": sum(len(b) for b in files.values()), "Online": True,
            "ContentDate": {"Start": start, "End": start},
            "Checksum": [{"Value": "0" * 32, "Algorithm": "MD5", "ChecksumDate": start}],
            "Attributes": [
                {"@odata.type": "#OData.CSC.StringAttribute", "Name": "productType", "Value": product_type,
                 "ValueType": "String"},
                {"@odata.type": "#OData.CSC.StringAttribute", "Name": "tileId", "Value": tile, "ValueType": "String"},
                {"@odata.type": "#OData.CSC.IntegerAttribute", "Name": "relativeOrbitNumber", "Value": int(orbit),
                 "ValueType": "Integer"},
                {"@odata.type": "#OData.CSC.DoubleAttribute", "Name": "cloudCover", "Value": cloud,
                 "ValueType": "Double"},
            ],
        })
        self.trees[product_id] = {f"{name}/{path}": data for path, data in files.items()}

    def expire_all_tokens(self) -> None:
        with self._lock:
            self._tokens = {token: 10**9 for token in self._tokens}

    # -- protocol pieces, called by the handler ----------------------------------------------------
    def issue_token(self, form: dict[str, str]) -> tuple[int, dict]:
        grant = form.get("grant_type")
        self.grants.append(grant)
        if form.get("client_id") != CLIENT_ID:
            return 401, {"error": "invalid_client"}
        if grant == "password":
            if (form.get("username"), form.get("password")) != (USERNAME, PASSWORD):
                return 401, {"error": "invalid_grant", "error_description": "Invalid user credentials"}
        elif grant == "refresh_token":
            if form.get("refresh_token") not in self._refresh_tokens:
                return 400, {"error": "invalid_grant", "error_description": "Token is not active"}
        else:
            return 400, {"error": "unsupported_grant_type"}
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[access] = 0
            self._refresh_tokens.add(refresh)
        return 200, {"access_token": access, "expires_in": self.expires_in, "refresh_expires_in": 3600,
                     "refresh_token": refresh, "token_type": "Bearer", "not-before-policy": 0,
                     "session_state": secrets.token_hex(8), "scope": "AUDIENCE_PUBLIC openid email profile"}

    def authorized(self, header: str | None) -> bool:
        token = (header or "").removeprefix("Bearer ")
        with self._lock:
            if token not in self._tokens:
                return False
            self._tokens[token] += 1
            return self.token_max_uses is None or self._tokens[token] <= self.token_max_uses

    def search_products(self, query: dict[str, str]) -> dict:
        flt = query.get("$filter", "")
        ge = re.search(r"ContentDate/Start ge (\S+)", flt).group(1)
        lt = re.search(r"ContentDate/Start lt (\S+)", flt).group(1)
        kind = re.search(r"'productType' and att/OData.CSC.StringAttribute/Value eq '(\w+)'", flt).group(1)
        cloud = float(re.search(r"'cloudCover' and att/OData.CSC.DoubleAttribute/Value le ([\d.]+)", flt).group(1))
        tile = re.search(r"'tileId' and att/OData.CSC.StringAttribute/Value eq '(\w+)'", flt)

        def keep(p):
            attrs = {a["Name"]: a["Value"] for a in p["Attributes"]}
            return (_ts(ge) <= _ts(p["ContentDate"]["Start"]) < _ts(lt) and attrs["productType"] == kind
                    and attrs["cloudCover"] <= cloud and (tile is None or attrs["tileId"] == tile.group(1)))

        matches = sorted((p for p in self.products if keep(p)), key=lambda p: p["ContentDate"]["Start"])
        top, skip = int(query.get("$top", 20)), int(query.get("$skip", 0))
        page = {"@odata.context": "$metadata#Products(Attributes())", "value": matches[skip:skip + top]}
        if skip + top < len(matches):
            page["@odata.nextLink"] = f"{self.url}/odata/v1/Products?" + urlencode({**query, "$skip": skip + top})
        return page

    def list_nodes(self, product_id: str, folder: str) -> dict | None:
        tree = self.trees.get(product_id, {})
        children: dict[str, list] = {}
        for path, data in tree.items():
            if path.startswith(folder + "/"):
                rest = path[len(folder) + 1:].split("/")
                entry = children.setdefault(rest[0], [0, 0])
                if len(rest) == 1:
                    entry[0] = self.listed_size.get(rest[0], len(data))
                else:
                    entry[1] += 1
        if not children:
            return None
        base = f"{self.url}/odata/v1/Products({product_id})" + "".join(f"/Nodes({p})" for p in folder.split("/"))
        return {"result": [
            {"Id": name, "Name": name, "ContentLength": size, "ChildrenNumber": count,
             "Nodes": {"uri": f"{base}/Nodes({name})/Nodes"}}
            for name, (size, count) in sorted(children.items())
        ]}

    def stac_landing_page(self) -> dict:
        """What Earth Search v1 answers at its root, trimmed to what a STAC API client reads."""
        api = f"{self.url}/stac"
        return {
            "type": "Catalog", "stac_version": "1.0.0", "id": "earth-search-aws", "title": "Earth Search by Element 84",
            "description": "A STAC API of public datasets on AWS",
            "conformsTo": [f"https://api.stacspec.org/v1.0.0/{c}" for c in (
                "core", "collections", "ogcapi-features", "item-search", "item-search#query", "item-search#sort",
                "item-search#fields")] + ["http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
                                         "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson"],
            "links": [
                {"rel": "self", "type": "application/json", "href": api},
                {"rel": "root", "type": "application/json", "href": api},
                {"rel": "conformance", "type": "application/json", "href": f"{api}/conformance"},
                {"rel": "data", "type": "application/json", "href": f"{api}/collections"},
                {"rel": "search", "type": "application/geo+json", "method": "GET", "href": f"{api}/search"},
                {"rel": "search", "type": "application/geo+json", "method": "POST", "href": f"{api}/search"},
            ],
        }

    def search_stac(self, body: dict) -> dict:
        start, end = (_ts(t) for t in body["datetime"].split("/"))
        query = body.get("query", {})

        def keep(item):
            p = item["properties"]
            ok = start <= _ts(p["datetime"]) <= end and item["collection"] in body["collections"]
            if "eo:cloud_cover" in query:
                ok &= p["eo:cloud_cover"] <= query["eo:cloud_cover"]["lte"]
            if "grid:code" in query:
                ok &= p["grid:code"] == query["grid:code"]["eq"]
            if "bbox" in body:
                x0, y0, x1, y1 = body["bbox"]
                bx0, by0, bx1, by1 = item["bbox"]
                ok &= bx0 <= x1 and x0 <= bx1 and by0 <= y1 and y0 <= by1
            return ok

        matches = [i for i in self.stac_items if keep(i)]
        offset, limit = int(body.get("next", 0)), int(body.get("limit", 10))
        links = [{"rel": "root", "href": f"{self.url}/stac", "type": "application/json"}]
        if offset + limit < len(matches):
            links.append({"rel": "next", "href": f"{self.url}/stac/search", "method": "POST",
                          "type": "application/geo+json", "merge": False,
                          "body": {**body, "next": str(offset + limit)}})
        return {"type": "FeatureCollection", "features": matches[offset:offset + limit], "links": links,
                "numberMatched": len(matches), "numberReturned": len(matches[offset:offset + limit])}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that timed out and hung up is expected
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms ACK stalls
    server_state: FakeCopernicus

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        fake = self.server_state
        fake.requests.append(("POST", self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/auth/token":
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            status, doc = fake.issue_token(form)
            return self._json(status, doc)
        if self.path == "/stac/search":
            if self._fault("stac/search") in ("drop", "429", "503"):
                return None
            return self._json(200, fake.search_stac(json.loads(body)), "application/geo+json")
        self._json(404, {"detail": "not found"})

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head: bool = False):
        fake = self.server_state
        fake.requests.append(("HEAD" if head else "GET", self.path))
        parts = urlsplit(self.path)
        if parts.path == "/stac":
            return self._json(200, fake.stac_landing_page())
        if parts.path == "/odata/v1/Products":
            return self._json(200, fake.search_products({k: v[0] for k, v in parse_qs(parts.query).items()}))
        if parts.path.startswith("/files/"):
            name = parts.path.removeprefix("/files/")
            if name not in fake.static:
                return self._json(404, {"detail": "not found"})
            return self._bytes(name, fake.static[name], head)
        node = _NODE_PATH.match(parts.path)
        if not node:
            return self._json(404, {"detail": "not found"})
        if not fake.authorized(self.headers.get("Authorization")):
            return self._json(401, {"detail": "Expired signature!"})
        prefix, product_id, nodes, tail = node.groups()
        path = "/".join(re.findall(r"/Nodes\(([^)]+)\)", nodes))
        if tail == "/Nodes":
            listing = fake.list_nodes(product_id, path)
            return self._json(200, listing) if listing else self._json(404, {"detail": "no such node"})
        if prefix == "odata/v1":  # CDSE hands file bytes out from another host: model that hop
            self.send_response(307)
            self.send_header("Location", f"/zipper/Products({product_id}){nodes}/$value")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        data = fake.trees.get(product_id, {}).get(path)
        if data is None:
            return self._json(404, {"detail": "no such file"})
        return self._bytes(path.rsplit("/", 1)[-1], data, head)

    def _fault(self, name: str) -> str | None:
        """Play the next fault queued for `name`; the fault, if it was answered here, else None or "truncate"."""
        fake = self.server_state
        fault = fake.faults[name].popleft() if fake.faults[name] else None
        if fault == "drop":
            self.close_connection = True
        elif fault == "stall":  # the client has given up when this answer goes out
            time.sleep(fake.stall_s)
            return None
        elif fault in ("429", "503"):
            self.send_response(int(fault))
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
        return fault

    def _bytes(self, name: str, data: bytes, head: bool):
        fake = self.server_state
        fault = self._fault(name)
        if fault in ("drop", "429", "503"):
            return
        start = 0
        if "Range" in self.headers:
            fake.range_requests.append(f"{name} {self.headers['Range']}")
            first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
            start = int(first)
            end = min(int(last), len(data) - 1) if last else len(data) - 1
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            chunk = data[start:end + 1]
        else:
            self.send_response(200)
            chunk = data
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if head:
            return
        with fake._lock:
            fake.active += 1
            fake.max_active = max(fake.max_active, fake.active)
        try:
            time.sleep(fake.value_delay_s)
            if fault == "truncate":  # announce everything, send half, hang up
                chunk = chunk[: len(chunk) // 2]
                self.close_connection = True
            self.wfile.write(chunk)
            fake.bytes_served[name] += len(chunk)
        finally:
            with fake._lock:
                fake.active -= 1

    def _json(self, status: int, doc: dict, content_type: str = "application/json"):
        payload = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
