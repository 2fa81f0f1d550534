"""Robust HTTP for the Sentinel-2 sources: retries, resumable downloads, integrity checks, one-line failures.

Every session both catalogues use (pystac-client's included) comes from `RetryPolicy`, which mounts
urllib3's Retry: 429 / 5xx (honouring Retry-After), read timeouts and dropped connections are retried
with exponential backoff. A connection that cannot be opened (refused, a host name that does not
resolve, no answer within the connect timeout) is not retried: waiting does not fix it, and the user
should hear at once. `request` adds what urllib3 does not: renewing the
token on 401, and redirects that carry it only within trusted domains. `download_all` fetches whole files
in parallel (at most 4 connections, CDSE's free quota), resumes partial files with HTTP Range from
`<file>.part`, checks size / checksum, and only then moves the file into place, so a file that exists
is a complete file and a re-run skips it. Failures are `HttpError`s of one line: host, what failed, what
to check.
"""

from __future__ import annotations

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
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.exceptions import (
    ConnectTimeoutError, MaxRetryError, NameResolutionError, NewConnectionError, ProtocolError, SSLError,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.retry import Retry

from s2match.data.sources import DownloadError

log = logging.getLogger(__name__)

# CDSE's free quota allows 4 parallel connections per user; Earth Search gets the same courtesy.
MAX_PARALLEL = 4
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
# Two refreshes in a row that still get 401 mean the account itself is refused.
MAX_AUTH_REFRESHES = 2
CHUNK_BYTES = 1 << 20
# What can break a response body after its headers arrived (requests' names for urllib3's errors).
BODY_ERRORS = (requests.exceptions.ChunkedEncodingError, requests.ConnectionError)


class HttpError(DownloadError):
    """A request that failed for good (after retries, or with a status that retrying cannot fix)."""


class IntegrityError(HttpError):
    """A downloaded file whose size or checksum differs from what the catalogue announced."""


class IncompleteBody(IOError):
    """The server closed the connection before sending the whole body."""


class Auth(Protocol):
    """Supplies the Authorization header and renews it when the server answers 401."""

    def headers(self) -> dict[str, str]: ...

    def refresh(self, rejected: Mapping[str, str]) -> None: ...


class _Retry(Retry):
    """urllib3's Retry, saying in the log which answer it retries (urllib3 only warns about broken connections)."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        if response is not None:
            host = f"{_pool.host}:{_pool.port}" if _pool is not None else ""
            log.warning("%s %s%s: HTTP %d; retrying (%s left)", method, host, _short(url or ""),
                        response.status, retry.total)
        return retry


@dataclass(frozen=True)
class RetryPolicy:
    retries: int
    backoff_s: float
    backoff_max_s: float
    connect_timeout_s: float
    timeout_s: float

    @classmethod
    def from_cfg(cls, cfg) -> RetryPolicy:
        return cls(
            retries=int(cfg.retries),
            backoff_s=float(cfg.backoff_s),
            backoff_max_s=float(cfg.backoff_max_s),
            connect_timeout_s=float(cfg.connect_timeout_s),
            timeout_s=float(cfg.timeout_s),
        )

    @property
    def timeouts(self) -> tuple[float, float]:
        """(connect, read) timeouts as requests takes them."""
        return self.connect_timeout_s, self.timeout_s

    def retry(self) -> Retry:
        """urllib3's retry rule for this policy (also what pystac-client's StacApiIO takes)."""
        return _Retry(
            total=self.retries,
            # No connection (refused, a name that does not resolve, no route, no answer within
            # connect_timeout_s, in which TCP has already resent its SYNs): waiting does not fix it, and
            # the user should hear at once. TLS and other errors do not recover either.
            connect=0,
            other=0,
            allowed_methods=None,  # every request the sources send may be repeated (searches, token, GET)
            status_forcelist=RETRY_STATUSES,
            raise_on_status=False,  # hand back the last 429 / 5xx: `request` words the error
            backoff_factor=self.backoff_s,
            backoff_max=self.backoff_max_s,
            # Jitter keeps parallel workers that failed together from retrying in lockstep.
            backoff_jitter=self.backoff_s,
            retry_after_max=int(self.backoff_max_s),
        )

    def session(self) -> requests.Session:
        """A session that retries by this policy; requests.Session is not thread-safe: one per thread."""
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=self.retry())
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def delay(self, attempt: int) -> float:
        """Seconds to wait before resuming a broken download for the `attempt`-th time (0-based)."""
        return min(self.backoff_s * 2**attempt, self.backoff_max_s) * random.uniform(0.5, 1.0)


def failure_message(method: str, url: str, error: requests.RequestException, policy: RetryPolicy) -> str:
    """One line for a request that got no answer: which host, what failed, what to check."""
    host = urlsplit(url).netloc
    reason = error.args[0] if error.args else error
    reason = reason.reason if isinstance(reason, MaxRetryError) else reason
    if isinstance(reason, NameResolutionError):
        return (f"{method} {host}: the host name does not resolve; check the network connection, a proxy, "
                "and the URLs under download.api")
    if isinstance(reason, NewConnectionError):
        cause = reason.__cause__ or reason.__context__
        what = getattr(cause, "strerror", None) or "connection failed"
        return (f"{method} {host}: cannot connect ({what.lower()}); check the network connection, a proxy, "
                "and the URLs under download.api")
    if isinstance(reason, ConnectTimeoutError) or isinstance(error, requests.ConnectTimeout):
        return (f"{method} {host}: no connection within {policy.connect_timeout_s:g} s; check the network "
                "connection, a firewall or proxy, and the URLs under download.api")
    if isinstance(reason, Urllib3Timeout) or isinstance(error, requests.Timeout):
        return (f"{method} {host}: no answer within {policy.timeout_s:g} s in {policy.retries + 1} tries; "
                "the service may be down (try again later) or slow (raise download.timeout_s)")
    if isinstance(reason, SSLError) or isinstance(error, requests.exceptions.SSLError):
        return f"{method} {host}: TLS handshake failed; check the system certificates and any proxy"
    if isinstance(reason, ProtocolError) or isinstance(error, requests.ConnectionError):
        return (f"{method} {host}: the connection dropped in {policy.retries + 1} tries; "
                "check the network connection and try again")
    return f"{method} {host}: {type(error).__name__}; check the network connection and the URLs under download.api"


def status_message(method: str, url: str, status: int, reason: str, policy: RetryPolicy) -> str:
    """One line for a request the server refused: which host and path, the status, what to check."""
    parts = urlsplit(url)
    where = f"{method} {parts.netloc}{parts.path}: HTTP {status}" + (f" {reason}" if reason else "")
    if status == 429:
        return (f"{where} after {policy.retries + 1} tries; the service limits requests: "
                "try again later or lower download.max_workers")
    if status in RETRY_STATUSES:
        return f"{where} after {policy.retries + 1} tries; the service is failing, try again later"
    if status in (401, 403):
        return f"{where}; the account may lack access to this product"
    return f"{where}; check the URLs under download.api"


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
    """Send one request through a `policy.session()` (which retries), renewing auth on 401.

    Redirects are followed here rather than by requests, which drops the Authorization header on
    any host change: CDSE redirects downloads to another host of its own domain. The token follows
    only to hosts in `trusted_domains`. Other 4xx answers raise HttpError unless listed in `accept`.
    """
    accept = frozenset(accept)
    trusted_domains = tuple(trusted_domains)
    refreshes = 0
    while True:
        try:
            response = _send_following_redirects(
                session, method, url, policy, auth, trusted_domains, dict(headers or {}), kwargs
            )
        except requests.RequestException as exc:
            raise HttpError(failure_message(method, url, exc, policy)) from None
        status = response.status_code
        if status < 400 or status in accept:
            return response
        response.close()
        if status == 401 and auth is not None and refreshes < MAX_AUTH_REFRESHES:
            log.info("%s %s: 401, renewing the access token", method, _short(url))
            auth.refresh(response.request.headers)
            refreshes += 1
            continue
        raise HttpError(status_message(method, url, status, response.reason, policy))


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
        if not hasattr(local, "session"):  # one per worker thread, reused across its jobs
            local.session = policy.session()
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
        except (IncompleteBody, *BODY_ERRORS) as exc:
            if attempt >= policy.retries:
                raise HttpError(f"GET {urlsplit(job.url).netloc}: {path.name} broke off {attempt + 1} times "
                                f"({type(exc).__name__}); try again later: the part received is kept and "
                                "resumed") from None
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
        response = session.request(method, url, headers=sent, allow_redirects=False, timeout=policy.timeouts,
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
