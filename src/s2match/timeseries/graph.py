"""The registration graph: which pairs of dates are matched, which are reliable, and the route of each date to the
reference.

Every date is matched with the reference (a star) and with its `neighbours` nearest dates on each side in time
(a chain: a snowy February is far from August, but close to March, which is close to April...). A registration
is reliable when it succeeded with at least `min_inliers` tie points and its precision (the standard error of
where it puts the frame's corners and centre, from the residuals and the tie points' number and spread) is at
most `max_sigma_px`. A date whose direct
registration to the reference is reliable uses it; otherwise it reaches the reference along the most reliable
chain: the path of reliable registrations with the least summed variance (sigma^2 of each, plus `hop_sigma_px`^2
per hop for what a fit's residuals do not show), composed hop by hop. A date no chain reaches is reported with
the reason and left out, never forced. Where a directly registered date also has a chain, the distance between
the two transforms at the centre of the reference (`closure_px`) is an independent check of both.

Transforms: H_a->b maps pixels of date a to pixels of date b (OpenCV convention); a hop taken backwards uses the
inverse; H_ref->date = H_(n-1)->n @ ... @ H_ref->1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from s2match.geo.homography import warp_points

REFERENCE, DIRECT, CHAIN, FAILED = "reference", "direct", "chain", "failed"
# Edge weights must be positive for the shortest-path search (a zero would read as no edge).
MIN_WEIGHT = 1e-12


@dataclass(frozen=True)
class Edge:
    """A pair to register: image0 = `source`, image1 = `target` (date names); `kind` reference | neighbour."""

    source: str
    target: str
    kind: str

    @property
    def key(self) -> str:
        return f"{self.source}__{self.target}"


@dataclass(frozen=True)
class Reliability:
    """conf/coregister/: when a registration is reliable, and the variance a hop adds beyond its residuals."""

    min_inliers: int
    max_sigma_px: float
    hop_sigma_px: float

    @classmethod
    def from_config(cls, cfg: Mapping) -> Reliability:
        return cls(int(cfg["min_inliers"]), float(cfg["max_sigma_px"]), float(cfg["hop_sigma_px"]))


@dataclass
class EdgeResult:
    """What one registration of an edge gave: success and reason (the report's), H (source px -> target px),
    tie points, residual RMSE, precision over the frame, the shift at the tie points, seconds, and where it ran."""

    edge: Edge
    success: bool
    reason: str
    H: np.ndarray | None = None
    inliers: int = 0
    rmse_px: float = math.nan
    sigma_px: float = math.inf  # standard error of H over the source's frame (s2match.timeseries.matching)
    shift_px: tuple[float, float] = (math.nan, math.nan)
    seconds: float = math.nan
    worker: str = ""
    pipeline: str = ""  # which pipeline instance ran it (one per worker process)
    weights: str = ""

    def weakness(self, rules: Reliability) -> str:
        """Why this registration is not reliable ('' when it is)."""
        if not self.success:
            return f"failed: {self.reason}"
        if self.inliers < rules.min_inliers:
            return f"weak: {self.inliers} tie points < coregister.min_inliers {rules.min_inliers}"
        if not self.sigma_px <= rules.max_sigma_px:
            return f"weak: precision {self.sigma_px:.3f} px > coregister.max_sigma_px {rules.max_sigma_px}"
        return ""

    def variance(self, rules: Reliability) -> float:
        return self.sigma_px**2 + rules.hop_sigma_px**2


@dataclass
class Route:
    """How one date is registered to the reference: status (reference | direct | chain | failed), the dates along
    the route (reference first), H_ref->date, its precision (sqrt of the summed variances), the edges used, the
    closure against the best other route, and the reason when it failed."""

    status: str
    path: list[str] = field(default_factory=list)
    H: np.ndarray | None = None
    sigma_px: float = math.nan
    edges: list[EdgeResult] = field(default_factory=list)
    closure_px: float = math.nan
    reason: str = ""


def plan_edges(names: Sequence[str], reference: str, neighbours: int) -> list[Edge]:
    """The star (reference -> every date) and each date with its `neighbours` next dates in time (earlier ->
    later), each pair once. `names` are in time order."""
    edges = [Edge(reference, name, "reference") for name in names if name != reference]
    linked = {frozenset((e.source, e.target)) for e in edges}
    for i, source in enumerate(names):
        for target in names[i + 1: i + 1 + neighbours]:
            if frozenset((source, target)) not in linked:
                edges.append(Edge(source, target, "neighbour"))
                linked.add(frozenset((source, target)))
    return edges


def compose(path: Sequence[str], results: Mapping[frozenset, EdgeResult]) -> tuple[np.ndarray, list[EdgeResult]]:
    """H_path[0]->path[-1] along the path's hops (each taken forwards or inverted) and the edges used."""
    H, used = np.eye(3), []
    for here, there in zip(path[:-1], path[1:]):
        result = results[frozenset((here, there))]
        hop = result.H if result.edge.source == here else np.linalg.inv(result.H)
        H = hop @ H
        used.append(result)
    return H / H[2, 2], used


def _shortest(names: list[str], reference: str, results: Mapping[frozenset, EdgeResult], rules: Reliability,
              excluded: frozenset | None = None) -> dict[str, list[str]]:
    """Least-variance paths from the reference over reliable edges (except `excluded`): {date: [ref, ..., date]}."""
    index = {name: i for i, name in enumerate(names)}
    rows, cols, weights = [], [], []
    for pair, result in results.items():
        if pair != excluded and not result.weakness(rules):
            rows.append(index[result.edge.source])
            cols.append(index[result.edge.target])
            weights.append(max(result.variance(rules), MIN_WEIGHT))
    graph = csr_matrix((weights, (rows, cols)), shape=(len(names), len(names)))
    _, predecessors = dijkstra(graph, directed=False, indices=index[reference], return_predecessors=True)
    paths = {}
    for name in names:
        path, node = [name], index[name]
        while predecessors[node] >= 0:
            node = predecessors[node]
            path.append(names[node])
        if path[-1] == reference and name != reference:
            paths[name] = path[::-1]
    return paths


def solve(names: list[str], reference: str, results: Sequence[EdgeResult], rules: Reliability,
          centre: np.ndarray) -> dict[str, Route]:
    """The route of every date to the reference (see the module docstring); `centre`: the reference's centre pixel,
    where closures are measured."""
    by_pair = {frozenset((r.edge.source, r.edge.target)): r for r in results}
    best = _shortest(names, reference, by_pair, rules)
    routes = {reference: Route(REFERENCE, [reference], np.eye(3), 0.0)}
    for name in names:
        if name == reference:
            continue
        direct_pair = frozenset((reference, name))
        direct = by_pair.get(direct_pair)
        direct_weakness = direct.weakness(rules) if direct is not None else "not matched"
        if not direct_weakness:
            path = [reference, name]
            other = _shortest(names, reference, by_pair, rules, excluded=direct_pair).get(name)
        elif name in best:
            path, other = best[name], None
        else:
            routes[name] = Route(FAILED, reason=f"direct registration {direct_weakness}; no chain of reliable "
                                                f"registrations reaches the reference")
            continue
        H, used = compose(path, by_pair)
        route = Route(DIRECT if len(path) == 2 else CHAIN, path, H,
                      math.sqrt(sum(edge.variance(rules) for edge in used)), used,
                      reason="" if len(path) == 2 else f"direct registration {direct_weakness}")
        if other is not None:
            H_other, _ = compose(other, by_pair)
            route.closure_px = float(np.linalg.norm(warp_points(H, centre) - warp_points(H_other, centre)))
        routes[name] = route
    return routes
