"""Template mutual matching (HETMM, Eqs. 3-6 of the paper) as pure JAX functions.

Conventions used throughout:

* ``query`` is one feature map (H, W, C) or a batch (B, H, W, C); ``templates`` is the template
  set (N, H, W, C): N "sheets", one per defect-free training image (or per PTS prototype).
* A window ``patch`` is an odd int (square) or a ``(height, width)`` pair of odd ints. Height is
  the row axis (axis -3 of the feature maps), width the column axis. The window centred on pixel
  (y, x) holds the offsets (dy, dx) with ``|dy| <= height // 2`` and ``|dx| <= width // 2``.
  The paper's Eq. 3 writes ``T[x + a, y + b]`` with ``|a| <= floor(m/2)``, ``|b| <= floor(n/2)``
  for an "n x m" patch: reading its (x, y) as (row, column), that patch is ``(height, width) =
  (m, n)``. The paper's settings are all square, where the reading does not matter.
* Window positions that fall outside the map are skipped (never padded with zeros), and a window
  may be larger than the map.
* Features are compared by cosine similarity. Inputs need not be L2-normalised; pass
  ``templates_normalized=True`` when the sheets already have unit norm to skip that pass.

How it is computed. For every template pixel (y, x), every offset (dy, dx) of the union of the
forward and backward windows and every query image, the best cosine over the sheets is

    best[y, x, dy, dx] = max_n cos(Q[y + dy, x + dx], T[n, y, x]).

Both directions are read off this one tensor: the forward distance of query pixel (y, x) is
``1 - max best[y - dy, x - dx, dy, dx]`` over its forward window (Eq. 4), and the backward
distance at (y, x) is ``1 - max best[y, x, dy, dx]`` over the backward window (Eq. 5). The dot
products of one template pixel with the query pixels of its window form a small matrix product
(window area x C) @ (C x N), batched over a block of rows and a chunk of sheets, with the maximum
over the sheets carried across chunks, so the extra memory is bounded by ``max_chunk_bytes``
whatever N is.

Notes:
    * Gradients: the exact functions give a subgradient (at a tie, one of the tied candidates
      takes it all); the ``smooth_*`` variants spread it over all candidates. Each row block is
      rematerialised (``jax.checkpoint``) in the backward pass, so differentiating does not
      store the gathered query windows of the whole map.
    * Sharding: templates placed by :func:`shard_templates` are matched on each device and the
      per-device maxima combined. Inside a caller's ``jax.jit`` the placement is not visible
      here; XLA's partitioner then decides (same results, possibly more communication).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hetmm_jax.errors import InputError
from hetmm_jax.postprocess import (  # noqa: F401  (re-exported)
    gaussian_blur,
    image_score,
    normalize_map,
    resize_maps,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_CHUNK_BYTES = 1 << 30
"""Default bound on the extra memory of one matching step (bytes)."""

_EPS = 1e-12
_TARGET_PIXELS = 64
"""Template pixels per matching step (see :func:`_plan`)."""
_TARGET_SHEETS = 128
"""Most sheets per matching step (see :func:`_plan`)."""

Patch = int | tuple[int, int]
LAYOUTS = ("NHWC", "HWNC")
"""Template layouts: sheet-major (N, H, W, C), the default, or pixel-major (H, W, N, C), which
the matrix products read without a transpose (see :func:`to_pixel_major`)."""


class _Window(NamedTuple):
    half_h: int
    half_w: int


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = _EPS) -> jax.Array:
    """Scales vectors to unit L2 norm along ``axis``; zero vectors stay zero.

    Args:
        x: array of any shape, e.g. features (..., C).
        axis: the axis holding the vector components.
        eps: norms below this are treated as ``eps`` (keeps the gradient finite at zero).

    Returns:
        Array of the shape of ``x``, float32 (or x's floating dtype).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    squared = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
    scale = lax.rsqrt(jnp.maximum(squared, eps * eps))
    return (x * scale).astype(x.dtype)


def _parse_patch(patch: Patch, name: str) -> tuple[int, int]:
    if isinstance(patch, (int, np.integer)) and not isinstance(patch, bool):
        sizes = (int(patch), int(patch))
    elif (
        isinstance(patch, (tuple, list))
        and len(patch) == 2
        and all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in patch)
    ):
        sizes = (int(patch[0]), int(patch[1]))
    else:
        raise InputError(f"{name}={patch!r}: expected an odd int or a (height, width) pair")
    if any(s < 1 or s % 2 == 0 for s in sizes):
        raise InputError(f"{name}={patch!r}: window sizes must be odd and >= 1")
    return sizes


def _window(patch: Patch, name: str, height: int, width: int) -> _Window:
    """Half-sizes of a window, clipped to the map: farther offsets never land inside it."""
    ph, pw = _parse_patch(patch, name)
    return _Window(min(ph // 2, height - 1), min(pw // 2, width - 1))


def _sheet_axis(layout: str) -> int:
    if layout not in LAYOUTS:
        raise InputError(f"layout={layout!r}: expected one of {LAYOUTS}")
    return layout.index("N")


def _check_inputs(query, templates, layout) -> tuple[jax.Array, jax.Array, bool]:
    axis = _sheet_axis(layout)
    query = jnp.asarray(query)
    templates = jnp.asarray(templates)
    single = query.ndim == 3
    if query.ndim not in (3, 4):
        raise InputError(f"query shape {query.shape}: expected (H, W, C) or (B, H, W, C)")
    if templates.ndim != 4:
        raise InputError(
            f"templates shape {templates.shape}: expected ({', '.join(layout)}) "
            f"(layout={layout!r})"
        )
    if single:
        query = query[None]
    sheet_shape = tuple(d for i, d in enumerate(templates.shape) if i != axis)
    if query.shape[1:] != sheet_shape:
        raise InputError(
            f"query maps {query.shape[1:]} and template sheets {sheet_shape} differ: "
            "expected the same (H, W, C)"
        )
    if templates.shape[axis] == 0:
        raise InputError("templates has 0 sheets: expected at least one")
    for name, arr in (("query", query), ("templates", templates)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise InputError(f"{name} dtype {arr.dtype}: expected a floating dtype")
    return query, templates, single


def _divisor_at_most(n: int, limit: int) -> int:
    limit = max(1, min(n, limit))
    for d in range(limit, 0, -1):
        if n % d == 0:
            return d
    return 1


def _plan(
    batch: int, height: int, width: int, channels: int, sheets: int, area: int,
    itemsize: int, max_chunk_bytes: int, rows: int | None, sheet_chunk: int | None,
) -> tuple[int, int]:
    """Chooses the row block and the sheet chunk of one step within the memory budget.

    Measured on a 2-core AVX-512 CPU: steps of about one 64-pixel row and up to ~128 sheets are
    fastest (the gathered query windows and the template rows stay near the caches); larger
    steps get slower, not faster, and chunking the sheets costs little.
    """
    query_px = batch * area * channels * 4  # gathered query windows, per template pixel
    # One sheet at one template pixel: its slice, its transposed copy and its scores.
    sheet_px = channels * itemsize * 2 + batch * area * 4
    if rows is None:
        fitting = max_chunk_bytes // (width * (query_px + sheet_px))
        rows = _divisor_at_most(height, max(1, min(_TARGET_PIXELS // width, fitting)))
    rows = max(1, min(int(rows), height))
    if sheet_chunk is None:
        room = max_chunk_bytes - rows * width * query_px
        sheet_chunk = min(sheets, _TARGET_SHEETS, max(1, room // (rows * width * sheet_px)))
        # Equal chunks: the last one overlaps its neighbour instead of being a sliver.
        sheet_chunk = -(-sheets // -(-sheets // sheet_chunk))
    sheet_chunk = max(1, min(int(sheet_chunk), sheets))
    step = rows * width * (query_px + sheet_chunk * sheet_px)
    if step > max_chunk_bytes:
        warnings.warn(
            f"one matching step needs about {step / 2**10:.0f} KiB, over max_chunk_bytes="
            f"{max_chunk_bytes}: the smallest step (one row, one sheet) is larger than the budget",
            RuntimeWarning, stacklevel=4,
        )
    return rows, sheet_chunk


def _valid_mask(height: int, width: int, win: _Window) -> np.ndarray:
    """(H, W, K) bool: template pixel (y, x) and offset k both land inside the map."""
    dy = np.arange(-win.half_h, win.half_h + 1)
    dx = np.arange(-win.half_w, win.half_w + 1)
    ys = np.arange(height)[:, None] + dy[None, :]
    xs = np.arange(width)[:, None] + dx[None, :]
    ok_y = (ys >= 0) & (ys < height)
    ok_x = (xs >= 0) & (xs < width)
    mask = ok_y[:, None, :, None] & ok_x[None, :, None, :]
    return mask.reshape(height, width, -1)


class _Reducer(NamedTuple):
    """The max over sheets / offsets, exact (temperature None) or as a soft-max."""

    temperature: float | None

    def over(self, x: jax.Array, axis) -> jax.Array:
        if self.temperature is None:
            return jnp.max(x, axis=axis)
        t = self.temperature
        return t * jax.nn.logsumexp(x / t, axis=axis)

    def combine(self, a: jax.Array, b: jax.Array) -> jax.Array:
        if self.temperature is None:
            return jnp.maximum(a, b)
        t = self.temperature
        return t * jnp.logaddexp(a / t, b / t)

    def across_devices(self, x: jax.Array, axis_name: str) -> jax.Array:
        # pmax has no differentiation rule, so it only ever sees gradient-free values; the
        # gradient flows through psum, which is linear.
        top = lax.pmax(lax.stop_gradient(x), axis_name)
        if self.temperature is None:
            # The exact max: its (sub)gradient is shared by the devices that hold the maximum.
            winner = (lax.stop_gradient(x) == top) & jnp.isfinite(top)
            count = lax.psum(winner.astype(x.dtype), axis_name)
            delta = jnp.where(winner, x - lax.stop_gradient(x), 0.0) / jnp.maximum(count, 1.0)
            return top + lax.psum(delta, axis_name)
        t = self.temperature
        # Offsets outside the map are -inf on every device; keep them -inf, not NaN.
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        return top + t * jnp.log(lax.psum(jnp.exp((x - top) / t), axis_name))


def _best_cosines(
    query: jax.Array, templates: jax.Array, win: _Window, reducer: _Reducer,
    rows: int, sheet_chunk: int, compute_dtype, layout: str,
) -> jax.Array:
    """best[b, y, x, k] = max_n <query[b, y+dy, x+dx], templates[n, y, x]> (unit-norm inputs).

    Args:
        query: (B, H, W, C), unit norm.
        templates: (N, H, W, C) or, for layout "HWNC", (H, W, N, C), unit norm.
        win: window half-sizes (offsets k run over (2*half_h+1) * (2*half_w+1), row-major).

    Returns:
        (B, H, W, K) float32; offsets landing outside the map hold -inf.
    """
    batch, height, width, channels = query.shape
    sheets = templates.shape[_sheet_axis(layout)]
    kh, kw = 2 * win.half_h + 1, 2 * win.half_w + 1
    area = kh * kw

    # Pixel-major layouts: the matrix products are batched over pixels, which must lead.
    padded = jnp.pad(
        jnp.transpose(query.astype(compute_dtype), (1, 2, 0, 3)),
        ((win.half_h, win.half_h), (win.half_w, win.half_w), (0, 0), (0, 0)),
    )  # (H + 2 half_h, W + 2 half_w, B, C)
    n_blocks = -(-height // rows)
    n_chunks = -(-sheets // sheet_chunk)

    def block_rows(start):
        # Clamped starts: the last block overlaps the previous one and recomputes equal values.
        window_rows = lax.dynamic_slice_in_dim(padded, start, rows + kh - 1, axis=0)
        gathered = jnp.stack(
            [
                window_rows[i:i + rows, j:j + width]
                for i in range(kh)
                for j in range(kw)
            ],
            axis=3,
        ).reshape(rows * width, batch * area, channels)

        def chunk(c, acc):
            first = jnp.minimum(c * sheet_chunk, sheets - sheet_chunk)
            if layout == "HWNC":
                sheet_rows = lax.dynamic_slice(
                    templates, (start, 0, first, 0), (rows, width, sheet_chunk, channels)
                )
            else:
                sheet_rows = jnp.transpose(
                    lax.dynamic_slice(
                        templates, (first, start, 0, 0), (sheet_chunk, rows, width, channels)
                    ),
                    (1, 2, 0, 3),
                )
            # One batch dimension: the fast batched matrix product path takes only one.
            sheet_rows = sheet_rows.astype(compute_dtype).reshape(
                rows * width, sheet_chunk, channels
            )
            scores = lax.dot_general(
                sheet_rows, gathered,
                dimension_numbers=(((2,), (2,)), ((0,), (0,))),
                preferred_element_type=jnp.float32,
            )  # (R * W, S, B * K)
            return reducer.combine(acc, reducer.over(scores, axis=1))

        init = jnp.full((rows * width, batch * area), -jnp.inf, jnp.float32)
        if n_chunks == 1:
            return chunk(0, init)
        return lax.fori_loop(0, n_chunks, chunk, init)

    block = jax.checkpoint(lambda start: block_rows(start).reshape(rows, width, -1))
    if n_blocks == 1:
        best = block(0)
    else:
        def body(i, out):
            start = jnp.minimum(i * rows, height - rows)
            return lax.dynamic_update_slice_in_dim(out, block(start), start, axis=0)

        best = lax.fori_loop(
            0, n_blocks, body, jnp.zeros((height, width, batch * area), jnp.float32)
        )
    best = jnp.transpose(best.reshape(height, width, batch, area), (2, 0, 1, 3))
    mask = jnp.asarray(_valid_mask(height, width, win))
    return jnp.where(mask, best, -jnp.inf)


def _offset_indices(win: _Window, sub: _Window) -> list[tuple[int, int, int]]:
    """(dy, dx, k) for the offsets of ``sub`` inside the offset list of ``win``."""
    kw = 2 * win.half_w + 1
    return [
        (dy, dx, (dy + win.half_h) * kw + (dx + win.half_w))
        for dy in range(-sub.half_h, sub.half_h + 1)
        for dx in range(-sub.half_w, sub.half_w + 1)
    ]


def _forward_from_best(best: jax.Array, win: _Window, fwd: _Window, reducer) -> jax.Array:
    """Eq. 4 from ``best``: query pixel (y, x) meets template pixel (y - dy, x - dx)."""
    _, height, width, _ = best.shape
    padded = jnp.pad(
        best,
        ((0, 0), (win.half_h, win.half_h), (win.half_w, win.half_w), (0, 0)),
        constant_values=-jnp.inf,
    )
    shifted = [
        padded[:, win.half_h - dy:win.half_h - dy + height,
               win.half_w - dx:win.half_w - dx + width, k]
        for dy, dx, k in _offset_indices(win, fwd)
    ]
    return 1.0 - reducer.over(jnp.stack(shifted, axis=-1), axis=-1)


def _backward_from_best(best: jax.Array, win: _Window, bwd: _Window, reducer) -> jax.Array:
    """Eq. 5 from ``best``: template pixel (y, x) meets query pixel (y + dy, x + dx)."""
    ks = np.array([k for _, _, k in _offset_indices(win, bwd)])
    return 1.0 - reducer.over(best[..., ks], axis=-1)


def _sheet_sharding(templates, layout: str) -> tuple[Mesh, str] | None:
    """The mesh and axis name when the sheets of a concrete array are split over devices."""
    sharding = getattr(templates, "sharding", None)
    if isinstance(templates, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * 4
    if any(spec[i] is not None for i in range(4) if i != _sheet_axis(layout)):
        return None
    axis = spec[_sheet_axis(layout)]
    if axis is None:
        return None
    if isinstance(axis, tuple):
        if len(axis) != 1:
            return None
        axis = axis[0]
    if sharding.mesh.shape[axis] == 1:
        return None
    return sharding.mesh, axis


@functools.partial(
    jax.jit,
    static_argnames=(
        "win", "fwd", "bwd", "temperature", "templates_normalized", "rows",
        "sheet_chunk", "compute_dtype", "layout", "mesh_axis", "mesh",
    ),
)
def _match(
    query, templates, *, win, fwd, bwd, alpha, temperature, templates_normalized, rows,
    sheet_chunk, compute_dtype, layout, mesh_axis, mesh,
):
    reducer = _Reducer(temperature)
    query = l2_normalize(query.astype(jnp.float32))
    if not templates_normalized:
        templates = l2_normalize(templates)

    def local_best(q, t):
        best = _best_cosines(q, t, win, reducer, rows, sheet_chunk, compute_dtype, layout)
        if mesh_axis is not None:
            best = reducer.across_devices(best, mesh_axis)
        return best

    if mesh_axis is None:
        best = local_best(query, templates)
    else:
        best = jax.shard_map(
            local_best,
            mesh=mesh,
            in_specs=(PartitionSpec(), _sheet_spec(mesh_axis, layout)),
            out_specs=PartitionSpec(),
            check_vma=False,
        )(query, templates)

    out = []
    if fwd is not None:
        out.append(_forward_from_best(best, win, fwd, reducer))
    if bwd is not None:
        out.append(_backward_from_best(best, win, bwd, reducer))
    if len(out) == 2:
        return alpha * out[0] + (1.0 - alpha) * out[1]
    return out[0]


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def _sheet_spec(axis_name: str, layout: str) -> PartitionSpec:
    spec = [None] * 4
    spec[_sheet_axis(layout)] = axis_name
    return PartitionSpec(*spec)


def _run(
    query, templates, forward_patch, backward_patch, alpha, *, temperature,
    templates_normalized, max_chunk_bytes, rows, sheet_chunk, compute_dtype, layout,
):
    query, templates, single = _check_inputs(query, templates, layout)
    batch, height, width, channels = query.shape
    if temperature is not None:
        temperature = float(temperature)
        if not temperature > 0:
            raise InputError(f"temperature={temperature}: expected a positive number")
    if max_chunk_bytes <= 0:
        raise InputError(f"max_chunk_bytes={max_chunk_bytes}: expected a positive byte count")
    fwd = bwd = None
    if forward_patch is not None:
        fwd = _window(forward_patch, "forward_patch", height, width)
    if backward_patch is not None:
        bwd = _window(backward_patch, "backward_patch", height, width)
    win = _Window(
        max(w.half_h for w in (fwd, bwd) if w is not None),
        max(w.half_w for w in (fwd, bwd) if w is not None),
    )
    compute_dtype = jnp.dtype(compute_dtype or templates.dtype)
    if compute_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        compute_dtype = jnp.dtype(jnp.float32)
    if compute_dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        _warn_once(
            "bfloat16 matching on CPU: half the template memory, but slower than float32 "
            "(about 1.3-2x in benchmarks/bench_matching.py), with map errors near 1e-3"
        )

    sharded = _sheet_sharding(templates, layout)
    mesh, mesh_axis = sharded if sharded is not None else (None, None)
    sheets = templates.shape[_sheet_axis(layout)]
    if mesh is not None:
        n_dev = mesh.shape[mesh_axis]
        if sheets % n_dev:
            raise InputError(
                f"templates has {sheets} sheets over {n_dev} devices: expected a multiple "
                "(use shard_templates, which pads by repeating a sheet)"
            )
        sheets //= n_dev

    area = (2 * win.half_h + 1) * (2 * win.half_w + 1)
    rows, sheet_chunk = _plan(
        batch, height, width, channels, sheets, area, compute_dtype.itemsize,
        max_chunk_bytes, rows, sheet_chunk,
    )
    out = _match(
        query, templates, win=win, fwd=fwd, bwd=bwd,
        alpha=alpha, temperature=temperature,
        templates_normalized=bool(templates_normalized), rows=rows,
        sheet_chunk=sheet_chunk, compute_dtype=compute_dtype, layout=layout,
        mesh_axis=mesh_axis, mesh=mesh,
    )
    return out[0] if single else out


_CHUNK_DOC = """
        templates_normalized: the sheets already have unit L2 norm (skips normalising them).
        max_chunk_bytes: bound on the extra memory of one matching step, in bytes.
        rows, sheet_chunk: force the row block / sheet chunk of one step (for tuning).
        compute_dtype: dtype of the matrix products, float32 or bfloat16 (default: the
            templates' dtype; accumulation is always float32). On CPU bfloat16 halves the
            template memory but is slower than float32 (a warning is logged).
        layout: "NHWC" (templates (N, H, W, C)) or "HWNC" (pixel-major (H, W, N, C), from
            :func:`to_pixel_major`), which saves a transpose of the sheets at every call
            (a small gain on CPU)."""


def forward_hetm(
    query, templates, patch: Patch, *, templates_normalized: bool = False,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, rows: int | None = None,
    sheet_chunk: int | None = None, compute_dtype=None, layout: str = "NHWC",
) -> jax.Array:
    """Forward HETM (Eq. 4): distance of each query pixel to its closest template pixel.

    ``D[y, x] = min over sheets n and offsets (dy, dx) in the window, with (y + dy, x + dx)
    inside the map, of 1 - cos(query[y, x], templates[n, y + dy, x + dx])``.

    Args:
        query: (H, W, C) or (B, H, W, C) features of the query image(s).
        templates: (N, H, W, C) template sheets (may be split over devices by
            :func:`shard_templates`).
        patch: odd int or (height, width) window, height along the rows.
    """ + _CHUNK_DOC + """

    Returns:
        (H, W) or (B, H, W) float32 cosine distances in [0, 2].
    """
    return _run(
        query, templates, patch, None, None, temperature=None,
        templates_normalized=templates_normalized, max_chunk_bytes=max_chunk_bytes,
        rows=rows, sheet_chunk=sheet_chunk, compute_dtype=compute_dtype, layout=layout,
    )


def backward_hetm(
    query, templates, patch: Patch, *, templates_normalized: bool = False,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, rows: int | None = None,
    sheet_chunk: int | None = None, compute_dtype=None, layout: str = "NHWC",
) -> jax.Array:
    """Backward HETM (Eq. 5): how well the query covers the templates at each position.

    ``D[y, x] = min over offsets (dy, dx) in the window, with (y + dy, x + dx) inside the map,
    of 1 - max over sheets n of cos(query[y + dy, x + dx], templates[n, y, x])``.

    Args:
        query: (H, W, C) or (B, H, W, C) features of the query image(s).
        templates: (N, H, W, C) template sheets.
        patch: odd int or (height, width) window, height along the rows.
    """ + _CHUNK_DOC + """

    Returns:
        (H, W) or (B, H, W) float32 cosine distances in [0, 2].
    """
    return _run(
        query, templates, None, patch, None, temperature=None,
        templates_normalized=templates_normalized, max_chunk_bytes=max_chunk_bytes,
        rows=rows, sheet_chunk=sheet_chunk, compute_dtype=compute_dtype, layout=layout,
    )


def hetmm(
    query, templates, forward_patch: Patch, backward_patch: Patch, alpha: float, *,
    templates_normalized: bool = False, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    rows: int | None = None, sheet_chunk: int | None = None, compute_dtype=None,
    layout: str = "NHWC",
) -> jax.Array:
    """HETMM (Eq. 6): ``alpha * forward_hetm + (1 - alpha) * backward_hetm``.

    Both directions share one pass over the templates (the dot products over the larger of the
    two windows), so this costs about as much as the forward matching alone.

    Args:
        query: (H, W, C) or (B, H, W, C) features of the query image(s).
        templates: (N, H, W, C) template sheets.
        forward_patch, backward_patch: odd int or (height, width) windows.
        alpha: weight of the forward (structural) distance, in [0, 1] (may be traced, e.g.
            differentiated).
    """ + _CHUNK_DOC + """

    Returns:
        (H, W) or (B, H, W) float32 anomaly map.
    """
    return _run(
        query, templates, forward_patch, backward_patch, alpha, temperature=None,
        templates_normalized=templates_normalized, max_chunk_bytes=max_chunk_bytes,
        rows=rows, sheet_chunk=sheet_chunk, compute_dtype=compute_dtype, layout=layout,
    )


def smooth_forward_hetm(query, templates, patch: Patch, temperature: float, **options):
    """:func:`forward_hetm` with each minimum replaced by a soft-minimum.

    ``softmin_t(d) = 1 - t * logsumexp((1 - d) / t)`` over the same candidates, which is at most
    the exact minimum and tends to it as ``temperature`` -> 0 (the gap is at most
    ``t * log(number of candidates)``). Every candidate receives gradient, which is what
    gradient-based experiments (e.g. adversarial or saliency studies) need.

    Args:
        query, templates, patch, options: as for :func:`forward_hetm`.
        temperature: positive softness, in units of cosine similarity.

    Returns:
        (H, W) or (B, H, W) float32.
    """
    return _run(query, templates, patch, None, None, temperature=temperature,
                **_with_defaults(options))


def smooth_backward_hetm(query, templates, patch: Patch, temperature: float, **options):
    """:func:`backward_hetm` with soft-min / soft-max (see :func:`smooth_forward_hetm`)."""
    return _run(query, templates, None, patch, None, temperature=temperature,
                **_with_defaults(options))


def smooth_hetmm(
    query, templates, forward_patch: Patch, backward_patch: Patch, alpha: float,
    temperature: float, **options,
):
    """:func:`hetmm` with soft-min / soft-max (see :func:`smooth_forward_hetm`)."""
    return _run(query, templates, forward_patch, backward_patch, alpha,
                temperature=temperature, **_with_defaults(options))


def _with_defaults(options: dict) -> dict:
    allowed = {
        "templates_normalized", "max_chunk_bytes", "rows", "sheet_chunk", "compute_dtype", "layout",
    }
    unknown = set(options) - allowed
    if unknown:
        raise InputError(f"unknown options {sorted(unknown)}: expected some of {sorted(allowed)}")
    return {
        "templates_normalized": False, "max_chunk_bytes": DEFAULT_MAX_CHUNK_BYTES,
        "rows": None, "sheet_chunk": None, "compute_dtype": None, "layout": "NHWC", **options,
    }


def anomaly_map(
    queries: Sequence, templates: Sequence, forward_patches: Sequence[Patch],
    backward_patches: Sequence[Patch], alphas, layer_weights=None, *,
    out_size: tuple[int, int], temperature: float | None = None, **options,
) -> jax.Array:
    """Multi-layer anomaly map (Eq. 10): per-layer HETMM, bilinear resize, weighted sum.

    Args:
        queries: per layer, (B, h_l, w_l, C_l) (or (h_l, w_l, C_l)) query features.
        templates: per layer, (N_l, h_l, w_l, C_l) template sheets.
        forward_patches, backward_patches: per layer, odd int or (height, width) windows.
        alphas: per layer (or one for all) forward weight of Eq. 6.
        layer_weights: per layer weight of the sum (default 1 each).
        out_size: (H, W) of the result, normally the input image size.
        temperature: when given, use the smooth variant (:func:`smooth_hetmm`).
        options: passed to :func:`hetmm` (``templates_normalized``, ``max_chunk_bytes``, ...).

    Returns:
        (B, H, W) float32 (or (H, W) for unbatched queries).
    """
    n_layers = len(queries)
    if n_layers == 0:
        raise InputError("queries is empty: expected one feature map per layer")

    def per_layer(value, name):
        if isinstance(value, (int, float, np.integer, np.floating)) or value is None:
            return [value] * n_layers
        value = list(value)
        if len(value) != n_layers:
            raise InputError(
                f"{name} has {len(value)} entries: expected {n_layers} (one per layer)"
            )
        return value

    templates = per_layer(templates, "templates")
    forward_patches = per_layer(forward_patches, "forward_patches")
    backward_patches = per_layer(backward_patches, "backward_patches")
    alphas = per_layer(alphas, "alphas")
    weights = per_layer(1.0 if layer_weights is None else layer_weights, "layer_weights")

    total = None
    for q, t, fp, bp, a, w in zip(
        queries, templates, forward_patches, backward_patches, alphas, weights, strict=True
    ):
        if temperature is None:
            layer = hetmm(q, t, fp, bp, a, **options)
        else:
            layer = smooth_hetmm(q, t, fp, bp, a, temperature, **options)
        layer = w * resize_maps(layer, out_size)
        total = layer if total is None else total + layer
    return total


def to_pixel_major(templates) -> jax.Array:
    """(N, H, W, C) sheets -> (H, W, N, C), the layout the matching reads fastest.

    Convert once (e.g. when the template set is built) and pass ``layout="HWNC"``; converting
    at every call would cost the transpose the layout is meant to save. Appending sheets
    ("hot update") is a concatenation along axis 2.
    """
    templates = jnp.asarray(templates)
    if templates.ndim != 4:
        raise InputError(f"templates shape {templates.shape}: expected (N, H, W, C)")
    return jnp.transpose(templates, (1, 2, 0, 3))


def shard_templates(
    templates, mesh: Mesh | None = None, axis_name: str | None = None, layout: str = "NHWC",
) -> jax.Array:
    """Places the template sheets over devices (split along N) for sharded matching.

    The matching functions recognise templates split this way and let every device match its
    own sheets, combining the per-device maxima at the end, so the results equal the
    single-device ones.

    Args:
        templates: (N, H, W, C) sheets.
        mesh: the device mesh; default a 1-D mesh over all local devices, axis ``"sheets"``.
        axis_name: the mesh axis to split the sheets over (default the mesh's first axis).
        layout: "NHWC" or "HWNC" (pixel-major, see :func:`to_pixel_major`).

    Returns:
        (N', H, W, C) array with N' the next multiple of the device count: the extra sheets
        repeat sheet 0, which cannot change a minimum or maximum over sheets.

    Warning:
        The smooth variants sum over sheets, so a repeated sheet counts twice there: with
        padding, their results are those of the padded set (a shift of at most
        ``temperature * log(N' / N)``). The exact functions are unaffected.
    """
    templates = jnp.asarray(templates)
    sheet_axis = _sheet_axis(layout)
    if templates.ndim != 4 or templates.shape[sheet_axis] == 0:
        raise InputError(
            f"templates shape {templates.shape}: expected ({', '.join(layout)}) with N >= 1"
        )
    if mesh is None:
        mesh = Mesh(np.array(jax.local_devices()), ("sheets",))
    axis_name = axis_name or mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise InputError(f"axis_name={axis_name!r}: expected one of {mesh.axis_names}")
    n_dev = mesh.shape[axis_name]
    sheets = templates.shape[sheet_axis]
    extra = (-sheets) % n_dev
    if extra:
        log.warning(
            "padding %d template sheets to %d (a multiple of %d devices) by repeating sheet 0: "
            "exact matching is unchanged, the smooth variants count that sheet %d extra times",
            sheets, sheets + extra, n_dev, extra,
        )
        first = lax.slice_in_dim(templates, 0, 1, axis=sheet_axis)
        shape = list(templates.shape)
        shape[sheet_axis] = extra
        templates = jnp.concatenate(
            [templates, jnp.broadcast_to(first, tuple(shape))], axis=sheet_axis
        )
    return jax.device_put(templates, NamedSharding(mesh, _sheet_spec(axis_name, layout)))
