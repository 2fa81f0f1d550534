"""Where the tasks of a co-registration run: on a Dask cluster, or in this process.

`coregister.scheduler`: `local` starts a `dask.distributed.LocalCluster` on this machine (workers = CPU cores unless
`coregister.workers` says otherwise), an address (`tcp://host:8786`) joins a running cluster (a `dask scheduler`,
dask-jobqueue on SLURM/PBS, Dask on Kubernetes), `none` runs every task here, one after the other, through the same
task functions (a single pair needs no cluster).

A task is a plain function `fn(context, *args)`. The `WorkerContext` is what one worker shares across its tasks:
the PairMatcher, built on its first registration (loading the model once per worker, not per task). On Dask it
lives in a worker plugin (every worker gets one, also workers that join later or replace a dead one). A task that
raises is run again up to `coregister.retries` times (Dask's `retries`; a worker that dies is replaced and its
tasks rescheduled by Dask); one that still fails comes back as an Outcome with the error, never dropped.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import torch
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker
from tqdm import tqdm

from s2match.timeseries.matching import MatcherSpec, PairMatcher

log = logging.getLogger(__name__)

PLUGIN_NAME = "s2match-coregister"
NO_DASK, LOCAL_CLUSTER = "none", "local"
ADDRESS_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")


class WorkerContext:
    """What the tasks of one worker share: the PairMatcher (built on first use, once) and the worker's name."""

    def __init__(self, spec: MatcherSpec, worker: str) -> None:
        self.spec, self.worker = spec, worker
        self._matcher: PairMatcher | None = None
        self._lock = threading.Lock()

    @property
    def matcher(self) -> PairMatcher:
        with self._lock:
            if self._matcher is None:
                self._matcher = PairMatcher(self.spec)
            return self._matcher


def limit_threads(threads: int) -> None:
    """Torch and OpenCV on `threads` CPU threads (workers share the cores between them)."""
    torch.set_num_threads(int(threads))
    cv2.setNumThreads(int(threads))


class ContextPlugin(WorkerPlugin):
    """Gives each Dask worker its WorkerContext."""

    def __init__(self, spec: MatcherSpec, threads: int) -> None:
        self.spec, self.threads = spec, threads
        self.context: WorkerContext | None = None

    def setup(self, worker) -> None:
        limit_threads(self.threads)
        self.context = WorkerContext(self.spec, worker.address)


def _on_worker(fn: Callable, *args: Any) -> Any:
    return fn(get_worker().plugins[PLUGIN_NAME].context, *args)


@dataclass
class Outcome:
    """A task's value, or the error that stopped it after its retries."""

    value: Any = None
    error: str = ""


class Executor(Protocol):
    def map(self, fn: Callable, jobs: Mapping[str, tuple], desc: str) -> dict[str, Outcome]:
        """Run fn(context, *args) for every job; {job key: Outcome}."""


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


class InProcess:
    """Every task here, one after the other, with the same retries."""

    def __init__(self, spec: MatcherSpec, threads: int, retries: int) -> None:
        limit_threads(threads)
        self.context, self.retries = WorkerContext(spec, "this process"), int(retries)

    def map(self, fn: Callable, jobs: Mapping[str, tuple], desc: str) -> dict[str, Outcome]:
        outcomes = {}
        for key, args in tqdm(jobs.items(), desc=desc, unit="task", disable=None):
            for attempt in range(self.retries + 1):
                try:
                    outcomes[key] = Outcome(fn(self.context, *args))
                    break
                except Exception as err:  # a task's failure is its date's, reported; never the whole run's
                    log.warning("%s %s: attempt %d of %d failed: %s", desc, key, attempt + 1, self.retries + 1,
                                _error(err))
                    outcomes[key] = Outcome(error=f"failed {attempt + 1} time(s): {_error(err)}")
        return outcomes


class DaskExecutor:
    """Tasks submitted to a Dask client, gathered as they complete."""

    def __init__(self, client: Client, retries: int) -> None:
        self.client, self.retries = client, int(retries)
        self.run = uuid.uuid4().hex[:8]

    def map(self, fn: Callable, jobs: Mapping[str, tuple], desc: str) -> dict[str, Outcome]:
        futures = {self.client.submit(_on_worker, fn, *args, key=f"{desc}-{key}-{self.run}", retries=self.retries,
                                      pure=False): key for key, args in jobs.items()}
        outcomes = {}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="task", disable=None):
            key = futures[future]
            if future.status == "finished":
                outcomes[key] = Outcome(future.result())
            else:
                error = _error(future.exception())
                log.warning("%s %s failed after %d retries: %s", desc, key, self.retries, error)
                outcomes[key] = Outcome(error=f"failed {self.retries + 1} time(s): {error}")
            future.release()
        return outcomes


@contextmanager
def open_executor(cfg: Mapping[str, Any], spec: MatcherSpec, threads_in_process: int) -> Iterator[Executor]:
    """The executor `cfg` (the coregister group) asks for; a cluster it starts is closed on exit."""
    scheduler = str(cfg["scheduler"])
    if scheduler == NO_DASK:
        yield InProcess(spec, threads_in_process, cfg["retries"])
        return
    cluster = None
    if scheduler == LOCAL_CLUSTER:
        workers = int(cfg["workers"] or os.cpu_count() or 1)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=bool(cfg["processes"]),
                               memory_limit=cfg["memory_limit"], dashboard_address=cfg["dashboard_address"])
        client = Client(cluster)
    elif scheduler.startswith(ADDRESS_SCHEMES):
        try:
            client = Client(scheduler)
        except (OSError, TimeoutError) as err:
            raise ValueError(f"coregister.scheduler={scheduler}: cannot reach the Dask scheduler ({_error(err)})") \
                from err
    else:
        raise ValueError(f"coregister.scheduler={scheduler}: expected `local`, `none` or a scheduler address "
                         "such as tcp://host:8786")
    registered = False
    try:
        workers = len(client.nthreads())
        log.info("Dask: %d worker(s) at %s; dashboard: %s", workers, client.scheduler.address, client.dashboard_link)
        if workers == 0:
            log.warning("the Dask cluster has no worker yet: tasks wait until workers join")
        client.register_plugin(ContextPlugin(spec, int(cfg["threads_per_worker"])), name=PLUGIN_NAME)
        registered = True
        yield DaskExecutor(client, cfg["retries"])
    finally:
        if registered and cluster is None:  # a cluster we joined keeps running: leave it as we found it
            client.unregister_worker_plugin(PLUGIN_NAME)
        client.close()
        if cluster is not None:
            cluster.close()
