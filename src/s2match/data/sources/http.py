"""Robust HTTP for the Sentinel-2 sources: retries, resumable downloads, integrity checks.

Both catalogues (CDSE, Earth Search) go through `request`, so 429 / 5xx / dropped connections are
handled once. `download_all` fetches whole files in parallel (at most 4 connections, CDSE's free
quota), resumes partial files with HTTP Range from `<file>.part`, checks size / checksum, and only
then moves the file into place, so a file that exists is a complete file and a re-run skips it.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import requests
from tqdm import tqdm

log = logging.getLogger(__name__)

# CDSE's free quota allows 4 parallel connections per user; Earth Search gets the same courtesy.
MAX_PARALLEL = 4
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
# Two refreshes in a row that still get 401 mean the account itself is refused.
MAX_AUTH_REFRESHES = 2
CHUNK_BYTES = 1 << 20
TRANSIENT_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class HttpError(RuntimeError):
    """A request that failed for good (after retries, or with a status that retrying cannot fix)."""


class IntegrityError(HttpError):
    """A downloaded file whose size or checksum differs from what the catalogue announced."""


class IncompleteBody(IOError):
    """The server closed the connection before sending the whole body."""


class Auth(Protocol):
    """Supplies the Authorization header and renews it when the server answers 401."""

    def headers(self) -> dict[str, str]: ...

    def refresh(self, rejected: Mapping[str, str]) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 60.0

    @classmethod
    def from_cfg(cls, cfg) -> RetryPolicy:
        return cls(
            retries=int(cfg.retries),
            backoff_s=float(cfg.backoff_s),
            backoff_max_s=float(cfg.backoff_max_s),
            timeout_s=float(cfg.timeout_s),
        )

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based); the server's Retry-After wins."""
        if retry_after:
            return min(_parse_retry_after(retry_after), self.backoff_max_s)
        # Jitter keeps parallel workers that failed together from retrying in lockstep.
        return min(self.backoff_s * 2**attempt, self.backoff_max_s) * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Checksum:
    algorithm: str  # a hashlib name: md5, sha256, sha512, sha1
    hexdigest: str

    # Multihash codes used by the STAC file extension (file:checksum).
    _MULTIHASH = {0x11: "sha1", 0x12: "sha256", 0x13: "sha512", 0xD5: "md5"}

    @classmethod
    def from_multihash(cls, hex_string: str) -> Checksum:
        """Decode a STAC `file:checksum` (hex multihash: varint code, varint length, digest)."""
        raw = bytes.fromhex(hex_string)
        code, pos = _read_varint(raw, 0)
        length, pos = _read_varint(raw, pos)
        if code not in cls._MULTIHASH:
            raise ValueError(f"file:checksum {hex_string[:12]}...: unsupported multihash code {code:#x}")
        if len(raw) - pos != length:
            raise ValueError(f"file:checksum {hex_string[:12]}...: digest length {len(raw) - pos} != {length}")
        return cls(cls._MULTIHASH[code], raw[pos:].hex())

    def matches(self, path: Path) -> bool:
        digest = hashlib.new(self.algorithm)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
                digest.update(block)
        return digest.hexdigest().lower() == self.hexdigest.lower()


@dataclass(frozen=True)
class FileJob:
    """One file to fetch whole: `size` / `checksum` are what the catalogue announced, if anything."""

    url: str
    path: Path
    size: int | None = None
    checksum: Checksum | None = None


def carries_auth(original_url: str, target_url: str, trusted_domains: Iterable[str]) -> bool:
    """Whether a redirect target may receive the bearer token: same host, or a trusted domain."""
    target = urlsplit(target_url).hostname or ""
    if target == urlsplit(original_url).hostname:
        return True
    return any(target == d or target.endswith("." + d) for d in trusted_domains)


def request(
    session: requests.Session,
    method: str,
    url: str,
    policy: RetryPolicy,
    *,
    auth: Auth | None = None,
    trusted_domains: Iterable[str] = (),
    accept: Iterable[int] = (),
    headers: Mapping[str, str] | None = None,
    **kwargs,
) -> requests.Response:
    """Send one request, retrying 429 / 5xx / dropped connections and renewing auth on 401.

    Redirects are followed here rather than by requests, which drops the Authorization header on
    any host change: CDSE redirects downloads to another host of its own domain. The token follows
    only to hosts in `trusted_domains`. Other 4xx answers raise HttpError unless listed in `accept`.
    """
    accept = frozenset(accept)
    trusted_domains = tuple(trusted_domains)
    attempt = refreshes = 0
    while True:
        try:
            response = _send_following_redirects(
                session, method, url, policy, auth, trusted_domains, dict(headers or {}), kwargs
            )
        except TRANSIENT_ERRORS as exc:
            if attempt >= policy.retries:
                raise HttpError(f"{method} {_short(url)}: {type(exc).__name__} after {attempt + 1} tries") from None
            wait = policy.delay(attempt)
            log.warning("%s %s: %s; retrying in %.1f s", method, _short(url), type(exc).__name__, wait)
            time.sleep(wait)
            attempt += 1
            continue
        status = response.status_code
        if status < 400 or status in accept:
            return response
        response.close()
        if status == 401 and auth is not None and refreshes < MAX_AUTH_REFRESHES:
            log.info("%s %s: 401, renewing the access token", method, _short(url))
            auth.refresh(response.request.headers)
            refreshes += 1
            continue
        if status in RETRY_STATUSES and attempt < policy.retries:
            wait = policy.delay(attempt, response.headers.get("Retry-After"))
            log.warning("%s %s: HTTP %d; retrying in %.1f s", method, _short(url), status, wait)
            time.sleep(wait)
            attempt += 1
            continue
        raise HttpError(f"{method} {_short(url)}: HTTP {status} {response.reason}")


def download_all(
    jobs: Iterable[FileJob],
    policy: RetryPolicy,
    *,
    max_workers: int = MAX_PARALLEL,
    auth: Auth | None = None,
    trusted_domains: Iterable[str] = (),
) -> list[Path]:
    """Fetch every job with a bounded thread pool; raise after all finished if any failed."""
    if not 1 <= max_workers <= MAX_PARALLEL:
        raise ValueError(f"max_workers={max_workers}: must be 1..{MAX_PARALLEL} (CDSE allows {MAX_PARALLEL} connections)")
    jobs = list(jobs)
    local = threading.local()

    def run(job: FileJob) -> Path:
        # requests.Session is not thread-safe: one per worker thread, reused across its jobs.
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return download(local.session, job, policy, auth=auth, trusted_domains=trusted_domains)

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="s2dl") as pool:
        futures = [pool.submit(run, job) for job in jobs]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise HttpError(f"{len(errors)} of {len(jobs)} downloads failed; first: {errors[0]}") from errors[0]
    return [f.result() for f in futures]


def download(
    session: requests.Session,
    job: FileJob,
    policy: RetryPolicy,
    *,
    auth: Auth | None = None,
    trusted_domains: Iterable[str] = (),
) -> Path:
    """Fetch one file to `job.path`, resuming `<path>.part` with Range after a dropped connection."""
    path = job.path
    if path.exists() and (job.size is None or path.stat().st_size == job.size):
        log.debug("%s is complete, skipped", path.name)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    for attempt in range(policy.retries + 1):
        try:
            _fetch_into(session, job, part, policy, auth, trusted_domains)
            break
        except (IncompleteBody, *TRANSIENT_ERRORS) as exc:
            if attempt >= policy.retries:
                raise HttpError(f"{path.name}: {type(exc).__name__} after {attempt + 1} tries") from None
            wait = policy.delay(attempt)
            have = part.stat().st_size if part.exists() else 0
            log.warning("%s: %s at %d bytes; resuming in %.1f s", path.name, type(exc).__name__, have, wait)
            time.sleep(wait)
    _verify(part, job)
    os.replace(part, path)
    return path


def _fetch_into(session, job: FileJob, part: Path, policy, auth, trusted_domains) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if job.size is not None and offset == job.size:
        return  # whole already; the caller verifies it
    if job.size is not None and offset > job.size:  # leftovers of another version of the file
        part.unlink()
        offset = 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    response = request(
        session, "GET", job.url, policy, auth=auth, trusted_domains=trusted_domains,
        accept={416}, headers=headers, stream=True,
    )
    with response:
        # Keep what arrived before a dropped connection (urllib3 would discard the last read) and
        # let the length check below trigger the resume.
        response.raw.enforce_content_length = False
        if response.status_code == 416:
            # The server has nothing past `offset`: the part file is already whole (or garbage).
            if job.size is None:
                return
            part.unlink()
            raise IncompleteBody(f"{job.path.name}: range {offset}- not satisfiable")
        if offset and response.status_code != 206:
            log.info("%s: server ignored the Range request, starting again", job.path.name)
            offset = 0
        length = response.headers.get("Content-Length")
        expected_total = offset + int(length) if length is not None else job.size
        with open(part, "ab" if offset else "wb") as fh, tqdm(
            total=expected_total, initial=offset, unit="B", unit_scale=True,
            desc=job.path.name, leave=False, disable=None,
        ) as bar:
            for chunk in response.iter_content(CHUNK_BYTES):
                fh.write(chunk)
                bar.update(len(chunk))
    received = part.stat().st_size
    if expected_total is not None and received < expected_total:
        raise IncompleteBody(f"{job.path.name}: {received} of {expected_total} bytes")


def _verify(part: Path, job: FileJob) -> None:
    size = part.stat().st_size
    problem = None
    if job.size is not None and size != job.size:
        problem = f"size {size} bytes, the catalogue announced {job.size}"
    elif job.checksum is not None and not job.checksum.matches(part):
        problem = f"{job.checksum.algorithm} checksum differs from the catalogue's"
    if problem:
        part.unlink()
        raise IntegrityError(f"{job.path}: {problem}; the file was removed")


def _send_following_redirects(session, method, url, policy, auth, trusted_domains, headers, kwargs):
    original = url
    for _ in range(MAX_REDIRECTS + 1):
        sent = dict(headers)
        if auth is not None and carries_auth(original, url, trusted_domains):
            sent.update(auth.headers())
        response = session.request(method, url, headers=sent, allow_redirects=False, timeout=policy.timeout_s,
                                   auth=_no_netrc, **kwargs)
        if response.status_code not in REDIRECT_STATUSES or "Location" not in response.headers:
            return response
        response.close()
        url = urljoin(url, response.headers["Location"])
        if response.status_code == 303:
            method, kwargs = "GET", {k: v for k, v in kwargs.items() if k not in ("data", "json")}
    raise HttpError(f"{method} {_short(original)}: more than {MAX_REDIRECTS} redirects")


def _no_netrc(prepared: requests.PreparedRequest) -> requests.PreparedRequest:
    """An explicit no-op auth: without one, requests adds Basic auth from ~/.netrc for a matching host,
    which would replace the bearer token and send the CDSE password along."""
    return prepared


def _parse_retry_after(value: str) -> float:
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def _short(url: str) -> str:
    """The URL without its query string: OData filters make log lines unreadable."""
    return url.split("?", 1)[0]
