"""Pixel-level Template Selection (PTS, Algorithm 1 of the HETMM paper) and baseline selections.

PTS shrinks a template set of N sheets to K sheets independently at every pixel position: at
position (y, x) it keeps K of the N vectors ``templates[:, y, x]``. A compressed sheet is
therefore a per-pixel composite, not one of the training images.

Algorithm 1, as implemented here, at one position with unit vectors w_1 .. w_N:

1. Density regions: OPTICS with the cosine distance 1 - cos(w_i, w_j) (host, NumPy + scikit-learn;
   see :func:`optics_labels`), or labels given by the caller.
2. Easy-nominal initialisation. For each region, in increasing label order (0, 1, ...), keep its
   centre, the member with the largest summed cosine similarity to the members of the region
   (Eq. 7). The sum includes the member itself, as Eq. 7 is written (the sum runs over the whole
   region) and as the authors' code computes it; the self term is 1 for every member, so it does
   not move the argmax. With more regions than K only the first K centres are kept. Without any
   region, the global centre (the same rule over all N vectors, Eq. 8) is kept.
3. Hard-nominal selection. While fewer than K are kept, keep the not-yet-kept vector with the
   largest *summed* cosine distance to the kept ones (Eq. 9).

Every argmax breaks ties toward the lowest sheet index. Scores are computed in float32, so two
mathematically equal scores (a two-member region's members always tie in Eq. 7; duplicated
vectors tie everywhere) may differ in the last bits: scores within ``TIE_TOLERANCE`` (1e-5) per
summed cosine of the best count as tied. Sheets of the result are in selection order (region
centres first, then hard-nominal prototypes).

Steps 2-3 run jitted and vmapped over positions on the default JAX device, with a fixed-size
``lax.fori_loop`` over the K steps. No N x N matrix is formed there: every sum of Eqs. 7-9 is a dot
product with a sum of unit vectors (the region sum, the total, the running distance sums), so a
step costs O(N C) per position and positions are processed in chunks of bounded memory.

Step 1 is the slow part of the reference code, which runs scikit-learn OPTICS with a Python
lambda as metric at every position. Here the OPTICS ordering (scikit-learn's
``compute_optics_graph``, reproduced step for step: the same core distances, the same rounding,
the same tie-breaking) is run in NumPy, vectorised over a chunk of positions, on precomputed
float64 cosine-distance matrices, and the clusters are extracted with scikit-learn's own
``cluster_optics_xi`` (the xi method, which ``OPTICS.labels_`` uses by default). Chunks of
positions are spread over threads (the array work releases the GIL). The labels equal
``OPTICS(metric="precomputed").labels_`` on each position's distance matrix.

Settings follow the authors' code, which passes only ``min_samples=N // K`` and the metric to
OPTICS: ``min_samples`` defaults to ``max(2, N // K)`` (scikit-learn requires at least 2), the
rest are scikit-learn's defaults (xi=0.05, min_cluster_size=min_samples, max_eps=inf,
predecessor correction on). One difference: their CUDA kernel visits regions in the order their
first member appears in sheet order; here, as in the paper, regions are visited in label order.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans, cluster_optics_xi
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from hetmm_jax.errors import InputError

log = logging.getLogger(__name__)

STRATEGIES = ("pts", "random", "random_image", "kmeans")

_NORM_EPS = 1e-12
# Full float32 dots on every backend: reduced-precision matmul (TF32, bfloat16 passes) would make
# score errors larger than TIE_TOLERANCE.
_HIGHEST = jax.lax.Precision.HIGHEST
# Host memory for the float64 N x N distance matrices of one OPTICS chunk, per thread.
_OPTICS_CHUNK_BYTES = 256 * 2**20
# Device memory for one chunk of the selection step (a few (P, N, C) float32 arrays).
_SELECT_CHUNK_BYTES = 256 * 2**20
# Scores of Eqs. 7-9 are sums of cosines; two that differ by less than this per summed term are
# equal up to float32 rounding (e.g. the two members of a two-member region always tie in Eq. 7)
# and the lower sheet index wins.
TIE_TOLERANCE = 1e-5
_OPTICS_KEYS = ("xi", "min_cluster_size", "predecessor_correction", "max_eps")


def pts(
    templates: Any,
    k: int,
    *,
    labels: Any = None,
    strategy: str = "pts",
    min_samples: int | None = None,
    optics_params: Mapping[str, Any] | None = None,
    seed: int = 0,
    n_jobs: int | None = None,
    chunk_size: int | None = None,
    return_indices: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Compress one layer's template set from N to K sheets, independently at every position.

    Args:
        templates: (N, H, W, C) float array (NumPy or JAX), the features of N defect-free images.
            Need not be L2-normalised: only cosine similarities are used.
        k: number of sheets K to keep, >= 1. K >= N returns the set unchanged (with a warning).
        labels: optional (H, W, N) integer density-region labels, -1 for noise, values below N,
            used instead of running OPTICS (``strategy="pts"`` only). Regions are visited in
            increasing label value.
        strategy: "pts" (Algorithm 1); "random" (K distinct sheets drawn independently at every
            position); "random_image" (the same K distinct sheets, i.e. whole images, at every
            position; with the same seed and N every layer gets the same images); "kmeans"
            (per position, k-means with K clusters on the L2-normalised vectors, then for each
            centroid in turn the nearest member not yet taken, so the K members are distinct).
        min_samples: OPTICS ``min_samples``; default ``max(2, N // K)``, the value the authors'
            code passes (N // K) raised to scikit-learn's minimum of 2.
        optics_params: further OPTICS settings: ``xi`` (0.05), ``min_cluster_size`` (None, i.e.
            ``min_samples``), ``predecessor_correction`` (True), ``max_eps`` (inf). The defaults
            are scikit-learn's; the authors pass none of them.
        seed: seed of the "random", "random_image" and "kmeans" strategies.
        n_jobs: threads for the host steps (OPTICS, k-means); default: the usable cores.
        chunk_size: positions per device chunk of the selection step; default from a 256 MiB
            budget.
        return_indices: also return the chosen sheet indices.

    Returns:
        (K, H, W, C) NumPy array of the input dtype, ``out[s, y, x] = templates[i, y, x]`` with
        ``i = indices[s, y, x]``; with ``return_indices`` also ``indices``, (K, H, W) int32.

    Raises:
        InputError: bad shape, K < 1, NaN or infinite values, bad labels or options.

    Note:
        OPTICS costs O(N^2) time per position on the host and O(P N^2) memory for a chunk of P
        positions (two float64 (P, N, N) buffers, about 256 MiB per thread); N of a few
        thousand is practical, tens of thousands is not (a warning is logged when one position
        alone exceeds that budget).
    """
    arr = _check_templates(templates)
    n, height, width, channels = arr.shape
    k = _check_k(k)
    if strategy not in STRATEGIES:
        raise InputError(f"pts: strategy={strategy!r}; expected one of {STRATEGIES}")
    if labels is not None and strategy != "pts":
        raise InputError(f"pts: labels are only used by strategy='pts', got strategy={strategy!r}")

    unknown = set(optics_params or {}) - set(_OPTICS_KEYS)
    if unknown:
        raise InputError(
            f"pts: optics_params has {sorted(unknown)}; expected keys among {_OPTICS_KEYS}"
        )

    if k >= n:
        warnings.warn(
            f"pts: K={k} >= N={n} sheets; the template set is returned unchanged", stacklevel=2
        )
        indices = np.broadcast_to(np.arange(n, dtype=np.int32)[:, None, None], (n, height, width))
        return (arr.copy(), indices.copy()) if return_indices else arr.copy()

    vectors = arr.reshape(n, height * width, channels).transpose(1, 0, 2)  # (P, N, C)
    start = time.perf_counter()
    if strategy == "pts":
        if labels is None:
            label_arr = optics_labels(
                arr, min_samples=_default_min_samples(n, k, min_samples), n_jobs=n_jobs,
                **dict(optics_params or {}),
            ).reshape(height * width, n)
        else:
            label_arr = _check_labels(labels, (height, width, n)).reshape(height * width, n)
        chosen = _select_positions(vectors, label_arr, k, chunk_size)
    elif strategy == "random":
        rng = np.random.default_rng(seed)
        chosen = np.argsort(rng.random((height * width, n)), axis=1, kind="stable")[:, :k]
    elif strategy == "random_image":
        rng = np.random.default_rng(seed)
        sheets = np.sort(rng.choice(n, size=k, replace=False))
        chosen = np.broadcast_to(sheets, (height * width, k))
    else:
        chosen = _kmeans_positions(vectors, k, seed, n_jobs)
    log.info(
        "pts: %s selected %d of %d sheets at %d positions in %.2f s",
        strategy, k, n, height * width, time.perf_counter() - start,
    )

    chosen = np.ascontiguousarray(chosen, dtype=np.int32)  # (P, K)
    out = np.take_along_axis(vectors, chosen[:, :, None].astype(np.intp), axis=1)  # (P, K, C)
    out = out.transpose(1, 0, 2).reshape(k, height, width, channels)
    if return_indices:
        return out, chosen.T.reshape(k, height, width)
    return out


def compress_templates(templates: Any, k: int, **kwargs: Any) -> Any:
    """Apply :func:`pts` to every layer of a template set.

    Args:
        templates: a mapping layer name -> (N, h, w, C) array, or a sequence of such arrays.
        k: sheets to keep per layer.
        **kwargs: passed to :func:`pts` (not ``labels`` or ``return_indices``, which are
            per-layer).

    Returns:
        A dict with the same keys in the same order (for a mapping) or a list (for a sequence) of
        (K, h, w, C) arrays.
    """
    for key in ("labels", "return_indices"):
        if key in kwargs:
            raise InputError(f"compress_templates: {key!r} is per layer; call pts() per layer")
    if isinstance(templates, Mapping):
        return {name: pts(layer, k, **kwargs) for name, layer in templates.items()}
    if isinstance(templates, Sequence) and not isinstance(templates, (str, bytes)):
        return [pts(layer, k, **kwargs) for layer in templates]
    raise InputError(
        f"compress_templates: got {type(templates).__name__}; expected a mapping of layer name "
        "to (N, h, w, C) array or a sequence of such arrays"
    )


def cosine_distances(vectors: Any, out: np.ndarray | None = None) -> np.ndarray:
    """Cosine-distance matrices, ready for OPTICS with ``metric="precomputed"``.

    Args:
        vectors: (..., N, C) float array; a zero vector is at distance 1 from every other one.
        out: optional float64 (..., N, N) array to write into.

    Returns:
        (..., N, N) float64 array of 1 - cos: exactly symmetric, rounding below 0 clipped to 0,
        zero diagonal.
    """
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)
    n = x.shape[-2]
    if out is None:
        out = np.empty(x.shape[:-1] + (n,), dtype=np.float64)
    flat_x = x.reshape(-1, n, x.shape[-1])
    flat_out = out.reshape(-1, n, n)
    for i in range(flat_x.shape[0]):
        # NumPy computes a 2-D ``a @ a.T`` with BLAS syrk and mirrors the triangle (or, without
        # BLAS, with the same products in the same order for (i, j) and (j, i)): the matrix is
        # exactly symmetric without a symmetrising pass.
        np.matmul(flat_x[i], flat_x[i].T, out=flat_out[i])
    np.subtract(1.0, out, out=out)
    np.maximum(out, 0.0, out=out)
    flat_out.reshape(-1, n * n)[:, :: n + 1] = 0.0
    return out


def optics_labels(
    templates: Any,
    *,
    min_samples: int,
    xi: float = 0.05,
    min_cluster_size: float | None = None,
    predecessor_correction: bool = True,
    max_eps: float = np.inf,
    n_jobs: int | None = None,
) -> np.ndarray:
    """OPTICS density regions of the N vectors at every position, cosine distance.

    Equals ``sklearn.cluster.OPTICS(min_samples=..., metric="precomputed", ...).fit(D).labels_``
    with ``D = cosine_distances(templates[:, y, x])`` at each position (xi extraction), computed
    for many positions at once.

    Args:
        templates: (N, H, W, C) float array.
        min_samples: OPTICS ``min_samples``, an integer in [2, N].
        xi, min_cluster_size, predecessor_correction, max_eps: as in scikit-learn's OPTICS.
        n_jobs: threads; default: the usable cores.

    Returns:
        (H, W, N) int32 labels, -1 for noise, regions numbered 0, 1, ... as scikit-learn does.
    """
    arr = _check_templates(templates)
    n, height, width, channels = arr.shape
    if isinstance(min_samples, bool) or not isinstance(min_samples, (int, np.integer)):
        raise InputError(f"optics_labels: min_samples={min_samples!r}; expected an integer")
    if not 2 <= min_samples <= n:
        raise InputError(
            f"optics_labels: min_samples={min_samples}; expected 2 <= min_samples <= N={n}"
        )
    if not max_eps > 0:
        raise InputError(f"optics_labels: max_eps={max_eps}; expected > 0")

    vectors = arr.reshape(n, height * width, channels).transpose(1, 0, 2)
    per_call = max(1, _OPTICS_CHUNK_BYTES // (8 * n * n * 2))
    if 8 * n * n * 2 > _OPTICS_CHUNK_BYTES:
        log.warning(
            "optics_labels: N=%d sheets need %.0f MiB of distance matrices per position and "
            "thread, and O(N^2) time per position", n, 16 * n * n / 2**20,
        )
    jobs = _n_jobs(n_jobs)
    start = time.perf_counter()
    labels = _map_chunks(
        functools.partial(
            _optics_chunk, min_samples=int(min_samples), xi=xi,
            min_cluster_size=min_cluster_size, predecessor_correction=predecessor_correction,
            max_eps=max_eps, per_call=per_call,
        ),
        vectors, jobs,
    )
    log.info(
        "optics_labels: %d positions, N=%d, min_samples=%d, %d threads, %.2f s",
        height * width, n, min_samples, jobs, time.perf_counter() - start,
    )
    return labels.reshape(height, width, n)


def _map_chunks(fn: Any, vectors: np.ndarray, jobs: int) -> Any:
    """``fn`` over chunks of the first axis of (P, ...) ``vectors`` on ``jobs`` threads.

    Threads, not processes: the work is NumPy / BLAS calls on large arrays, which release the
    GIL, so threads share the cores without copying the templates or importing anything. BLAS
    and OpenMP are held to one thread each meanwhile so the threads do not oversubscribe cores.
    """
    n_pos = vectors.shape[0]
    # Two chunks per thread: few enough that per-chunk buffers are allocated rarely, enough to
    # keep both threads busy when chunks take unequal times.
    chunk = max(1, math.ceil(n_pos / (2 * jobs)))
    starts = range(0, n_pos, chunk)
    with threadpool_limits(limits=1):
        if jobs == 1 or len(starts) == 1:
            parts = [fn(vectors[s:s + chunk]) for s in starts]
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                parts = list(pool.map(lambda s: fn(vectors[s:s + chunk]), starts))
    return np.concatenate(parts, axis=0)


def select_indices(
    templates: Any, labels: Any, k: int, *, chunk_size: int | None = None
) -> np.ndarray:
    """Steps 2-3 of Algorithm 1 (Eqs. 7-9) for given region labels, on the JAX device.

    Args:
        templates: (N, H, W, C) float array.
        labels: (H, W, N) integer labels, -1 for noise, values below N.
        k: sheets to keep, 1 <= K < N.
        chunk_size: positions per device chunk; default from a 256 MiB budget.

    Returns:
        (K, H, W) int32 sheet indices in selection order.
    """
    arr = _check_templates(templates)
    n, height, width, channels = arr.shape
    k = _check_k(k)
    if k >= n:
        raise InputError(f"select_indices: K={k}; expected K < N={n}")
    label_arr = _check_labels(labels, (height, width, n)).reshape(height * width, n)
    vectors = arr.reshape(n, height * width, channels).transpose(1, 0, 2)
    chosen = _select_positions(vectors, label_arr, k, chunk_size)
    return np.ascontiguousarray(chosen.T.reshape(k, height, width), dtype=np.int32)


def _select_positions(
    vectors: np.ndarray, labels: np.ndarray, k: int, chunk_size: int | None
) -> np.ndarray:
    """Run the jitted selection on (P, N, C) vectors, (P, N) labels in padded chunks -> (P, K)."""
    n_pos, n, channels = vectors.shape
    if chunk_size is None:
        chunk_size = max(1, _SELECT_CHUNK_BYTES // (4 * n * channels * 4))
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise InputError(f"pts: chunk_size={chunk_size!r}; expected a positive integer")
    chunk_size = int(min(chunk_size, n_pos))
    out = np.empty((n_pos, k), dtype=np.int32)
    for s in range(0, n_pos, chunk_size):
        part = np.asarray(vectors[s:s + chunk_size], dtype=np.float32)
        part_labels = labels[s:s + chunk_size]
        m = part.shape[0]
        if m < chunk_size:
            # Padding keeps one compiled shape for every chunk.
            part = np.concatenate([part, np.zeros((chunk_size - m, n, channels), np.float32)])
            part_labels = np.concatenate(
                [part_labels, np.full((chunk_size - m, n), -1, part_labels.dtype)]
            )
        chosen = _select_chunk(jnp.asarray(part), jnp.asarray(part_labels, jnp.int32), k)
        out[s:s + m] = np.asarray(chosen)[:m]
    return out


@functools.partial(jax.jit, static_argnames=("k",))
def _select_chunk(vectors: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """(P, N, C) float32, (P, N) int32 -> (P, K) int32 sheet indices."""
    return jax.vmap(functools.partial(_select_one, k=k))(vectors, labels)


def _select_one(vectors: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Algorithm 1, steps 2-3, at one position: (N, C), (N,) -> (K,) indices."""
    n = vectors.shape[0]
    norm = jnp.sqrt(jnp.sum(vectors * vectors, axis=-1, keepdims=True))
    x = vectors / jnp.maximum(norm, _NORM_EPS)
    index = jnp.arange(n)

    # Eq. 7 for every region at once. For unit vectors sum_{v in r} cos(w, v) = w . sum_{v in r} v;
    # labels index the segments, noise goes to the extra segment n.
    segment = jnp.where(labels >= 0, labels, n)
    region_sums = jax.ops.segment_sum(x, segment, num_segments=n + 1)
    region_score = jnp.sum(x * region_sums[segment], axis=-1)
    size = jax.ops.segment_sum(jnp.ones(n, jnp.int32), segment, num_segments=n + 1)
    best = jax.ops.segment_max(region_score, segment, num_segments=n + 1)
    tied = region_score >= best[segment] - TIE_TOLERANCE * jnp.maximum(size[segment], 1)
    centre_of = jax.ops.segment_min(jnp.where(tied, index, n), segment, num_segments=n + 1)
    # Centres in label order, the first K of them.
    present = (size > 0).at[n].set(False)
    rank = jnp.cumsum(present) - 1
    n_centres = jnp.minimum(jnp.sum(present), k)
    slot = jnp.where(present & (rank < k), rank, k)
    centres = jnp.zeros(k, jnp.int32).at[slot].set(centre_of.astype(jnp.int32), mode="drop")

    global_score = jnp.dot(x, jnp.sum(x, axis=0), precision=_HIGHEST)  # Eq. 8
    global_centre = _first_max(global_score, None, n)

    def step(t, state):
        kept, chosen, distance_sum = state
        hard = _first_max(distance_sum, ~kept, t)  # Eq. 9
        pick = jnp.where(t < n_centres, centres[t], jnp.where(t == 0, global_centre, hard))
        distance_sum = distance_sum + (1.0 - jnp.dot(x, x[pick], precision=_HIGHEST))
        return kept.at[pick].set(True), chosen.at[t].set(pick.astype(jnp.int32)), distance_sum

    state = (jnp.zeros(n, bool), jnp.zeros(k, jnp.int32), jnp.zeros(n, x.dtype))
    # The barrier keeps XLA from constant-folding the first steps (a loop of one or two steps
    # is unrolled), which costs seconds of compilation for nothing.
    state = jax.lax.optimization_barrier(state)
    return jax.lax.fori_loop(0, k, step, state)[1]


def _first_max(
    score: jax.Array, candidate: jax.Array | None, terms: jax.Array | int
) -> jax.Array:
    """Lowest index among the candidates (all if None) whose score ties the best.

    Ties are scores within TIE_TOLERANCE per summed term of the best.
    """
    if candidate is not None:
        score = jnp.where(candidate, score, -jnp.inf)
    tied = score >= jnp.max(score) - TIE_TOLERANCE * jnp.maximum(terms, 1)
    return jnp.argmax(tied)


def _optics_chunk(
    vectors: np.ndarray,
    *,
    min_samples: int,
    xi: float,
    min_cluster_size: float | None,
    predecessor_correction: bool,
    max_eps: float,
    per_call: int,
) -> np.ndarray:
    """OPTICS labels for (P, N, C) vectors -> (P, N) int32, ``per_call`` positions at a time."""
    n_pos, n, _ = vectors.shape
    labels = np.empty((n_pos, n), dtype=np.int32)
    # Two reused (per_call, N, N) buffers: fresh ones of this size cost page faults every call.
    dist_buffer = np.empty((min(per_call, n_pos), n, n))
    scratch = np.empty_like(dist_buffer)
    for s in range(0, n_pos, per_call):
        m = min(per_call, n_pos - s)
        dist = cosine_distances(vectors[s:s + m], out=dist_buffer[:m])
        ordering, reachability, predecessor = _optics_graph(
            dist, min_samples, max_eps, scratch=scratch[:m]
        )
        for i in range(m):
            labels[s + i], _ = cluster_optics_xi(
                reachability=reachability[i],
                predecessor=predecessor[i],
                ordering=ordering[i],
                min_samples=min_samples,
                min_cluster_size=min_cluster_size,
                xi=xi,
                predecessor_correction=predecessor_correction,
            )
    return labels


def _optics_graph(
    dist: np.ndarray, min_samples: int, max_eps: float, scratch: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's ``compute_optics_graph`` for (P, N, N) precomputed distances, vectorised.

    Same core distances (the min_samples-th smallest distance, the point itself included), same
    rounding to 15 decimals, same neighbourhoods (distance <= max_eps), same order of visits
    (smallest reachability, then lowest index) and same strict-improvement rule. ``dist`` is
    overwritten; ``scratch``, if given, is a work array of the same shape.

    Returns:
        ordering, reachability, predecessor: (P, N) arrays as scikit-learn returns per position.
    """
    n_pos, n, _ = dist.shape
    rows = np.arange(n_pos)
    if scratch is None:
        scratch = np.empty_like(dist)
    np.copyto(scratch, dist)
    scratch.partition(min_samples - 1, axis=-1)
    core = scratch[..., min_samples - 1].copy()
    core[core > max_eps] = np.inf
    decimals = np.finfo(np.float64).precision
    np.around(core, decimals=decimals, out=core)

    # The reachability a visit of point i offers to j, max(core_i, d_ij) rounded, depends on
    # (i, j) only: computing it once for all pairs leaves a gather and a compare per visit.
    offer = dist
    if np.isfinite(max_eps):
        offer[offer > max_eps] = np.inf  # outside the neighbourhood: no offer
    np.maximum(offer, core[:, :, None], out=offer)
    np.around(offer, decimals=decimals, out=offer)
    offer[np.isinf(core)] = np.inf  # a point that is not core reaches nobody

    best = np.full((n_pos, n), np.inf)  # reachability so far; inf once processed
    reachability = np.full((n_pos, n), np.inf)
    predecessor = np.full((n_pos, n), -1, dtype=np.intp)
    processed = np.zeros((n_pos, n), dtype=bool)
    ordering = np.empty((n_pos, n), dtype=np.intp)
    for step in range(n):
        point = np.argmin(best, axis=1)
        value = best[rows, point]
        stuck = np.isinf(value)
        if stuck.any():
            # Every unprocessed point is unreachable: scikit-learn takes the first unprocessed.
            point = np.where(stuck, np.argmin(processed, axis=1), point)
        reachability[rows, point] = value
        processed[rows, point] = True
        best[rows, point] = np.inf
        ordering[:, step] = point

        offered = offer[rows, point]
        improved = offered < best
        improved &= ~processed
        np.copyto(best, offered, where=improved)
        np.copyto(predecessor, point[:, None], where=improved)
    return ordering, reachability, predecessor


def _kmeans_positions(vectors: np.ndarray, k: int, seed: int, n_jobs: int | None) -> np.ndarray:
    """Per-position k-means nearest distinct members: (P, N, C) -> (P, K), on threads."""
    return _map_chunks(functools.partial(_kmeans_chunk, k=k, seed=seed), vectors, _n_jobs(n_jobs))


def _kmeans_chunk(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)
    chosen = np.empty((x.shape[0], k), dtype=np.int32)
    for p in range(x.shape[0]):
        with warnings.catch_warnings():
            # Fewer distinct vectors than K: k-means warns; distinct members are still taken.
            warnings.simplefilter("ignore", ConvergenceWarning)
            centres = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x[p]).cluster_centers_
        dist = np.sum((centres[:, None, :] - x[p][None, :, :]) ** 2, axis=-1)  # (K, N)
        taken = np.zeros(x.shape[1], dtype=bool)
        for c in range(k):
            j = int(np.argmin(np.where(taken, np.inf, dist[c])))
            taken[j] = True
            chosen[p, c] = j
    return chosen


def _check_templates(templates: Any) -> np.ndarray:
    arr = np.asarray(templates)
    if arr.ndim != 4:
        raise InputError(f"pts: templates have shape {arr.shape}; expected (N, H, W, C)")
    if not jnp.issubdtype(arr.dtype, jnp.floating):  # NumPy floats and bfloat16
        raise InputError(f"pts: templates have dtype {arr.dtype}; expected a float dtype")
    if min(arr.shape) < 1:
        raise InputError(f"pts: templates have shape {arr.shape}; expected no empty axis")
    if not np.all(np.isfinite(arr)):
        raise InputError("pts: templates contain NaN or infinite values; expected finite features")
    return arr


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"pts: k={k!r}; expected an integer >= 1")
    return int(k)


def _check_labels(labels: Any, shape: tuple[int, int, int]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != shape:
        raise InputError(f"pts: labels have shape {arr.shape}; expected (H, W, N) = {shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"pts: labels have dtype {arr.dtype}; expected integers")
    n = shape[2]
    if arr.size and (arr.min() < -1 or arr.max() >= n):
        raise InputError(
            f"pts: labels range over [{arr.min()}, {arr.max()}]; expected -1 (noise) to N-1={n - 1}"
        )
    return arr.astype(np.int32)


def _default_min_samples(n: int, k: int, min_samples: int | None) -> int:
    if min_samples is None:
        return max(2, n // k)
    return min_samples


def _n_jobs(n_jobs: int | None) -> int:
    if n_jobs is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:
            return max(1, os.cpu_count() or 1)
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise InputError(f"pts: n_jobs={n_jobs!r}; expected a positive integer or None")
    return int(n_jobs)
