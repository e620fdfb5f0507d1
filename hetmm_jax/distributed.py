"""Scale-out: template sheets and query images split over a 2-D device mesh.

The mesh has two axes:

* ``"sheets"`` -- the template set is split along N: each device along this axis holds
  ``N / sheets`` sheets of every layer, so the set may be larger than one device's memory;
* ``"queries"`` -- the query batch is split: each row of the mesh scores its own images
  against the whole (split) template set; no communication is needed between rows.

Why the split over sheets is exact. Both HETMM directions are a minimum over a joint set of
candidates (sheets x window offsets): Eq. 4 is ``1 - max_{n, offset} cos`` and Eq. 5 is
``min_offset (1 - max_n cos) = 1 - max_{n, offset} cos`` over its own pairs. A maximum over all
sheets is the maximum over the devices of each device's maximum, so every device runs the
ordinary single-device matching on its sheets (:func:`hetmm_jax.matching.forward_hetm`,
:func:`~hetmm_jax.matching.backward_hetm`) and one ``pmin`` over the ``"sheets"`` axis per
direction gives the result of the whole set. The smooth variants replace the joint maximum by a
log-sum-exp, which splits the same way (``t * log(sum over devices of exp(local / t))``). Eq. 6
fuses the two directions after that reduction.

Multi-host: with :func:`jax.distributed.initialize` called on every process, ``jax.devices()``
lists the devices of all hosts and a mesh from :func:`make_mesh` spans them; see
``docs/scaling.md`` for a worked example (tested here only with forced host-platform CPU
devices in one process).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hetmm_jax import matching, postprocess
from hetmm_jax.errors import InputError, NotFittedError

log = logging.getLogger(__name__)

AXES = ("queries", "sheets")
"""Mesh axis names: query batch, template sheets."""

_FEW_SHEETS = 4
"""Below this many sheets per device, a split over "sheets" is reported as wasteful."""

__all__ = [
    "AXES", "describe", "make_mesh", "predict_sharded", "shard_queries", "shard_template_set",
    "sharded_anomaly_map",
]


def host_devices_env(n_devices: int, root: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment for a child Python process that sees ``n_devices`` CPU devices.

    XLA reads ``--xla_force_host_platform_device_count`` once, when jax starts, so a test or a
    benchmark that needs several devices on one CPU runs its work in a child process started
    with this environment (``subprocess.run(..., env=host_devices_env(4))``).

    Args:
        n_devices: number of host (CPU) devices the child gets.
        root: a folder put first on the child's ``PYTHONPATH`` (e.g. a source checkout).

    Returns:
        A copy of ``os.environ`` with ``XLA_FLAGS``, ``JAX_PLATFORMS`` and ``PYTHONPATH`` set.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={int(n_devices)}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def make_mesh(queries: int | None = None, sheets: int | None = None, devices=None) -> Mesh:
    """A 2-D mesh with axes ("queries", "sheets") over the given devices.

    Args:
        queries: devices along the query-batch axis; default: what ``sheets`` leaves (1 when
            both are None, so that by default every device holds a part of the templates).
        sheets: devices along the template-sheet axis; default: what ``queries`` leaves.
        devices: the devices to use, default ``jax.devices()`` (all devices of all processes
            when :func:`jax.distributed.initialize` has run).

    Returns:
        A :class:`jax.sharding.Mesh` of shape (queries, sheets).
    """
    devices = list(jax.devices() if devices is None else devices)
    total = len(devices)
    if total == 0:
        raise InputError("devices is empty: expected at least one device")
    if queries is None and sheets is None:
        queries = 1
    if queries is None:
        queries = total // int(sheets) if int(sheets) > 0 else 0
    if sheets is None:
        sheets = total // int(queries) if int(queries) > 0 else 0
    queries, sheets = int(queries), int(sheets)
    if queries < 1 or sheets < 1 or queries * sheets != total:
        raise InputError(
            f"mesh queries={queries} x sheets={sheets}: expected positive sizes whose product "
            f"is the {total} devices"
        )
    return Mesh(np.array(devices, dtype=object).reshape(queries, sheets), AXES)


def _check_mesh(mesh: Mesh) -> Mesh:
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
        names = getattr(mesh, "axis_names", None)
        raise InputError(f"mesh axes {names}: expected a Mesh with axes {AXES} (make_mesh)")
    return mesh


def _pad_axis0(array, multiple: int, what: str, warn_smooth: bool):
    count = array.shape[0]
    extra = (-count) % multiple
    if not extra:
        return array
    if warn_smooth:
        log.warning(
            "padding %d %s to %d (a multiple of %d devices) by repeating the first: exact "
            "matching is unchanged, the smooth variants count it %d extra times",
            count, what, count + extra, multiple, extra,
        )
    filler = jnp.broadcast_to(array[:1], (extra, *array.shape[1:]))
    return jnp.concatenate([jnp.asarray(array), filler], axis=0)


def _is_placed(array, mesh: Mesh, spec: P) -> bool:
    sharding = getattr(array, "sharding", None)
    return isinstance(sharding, NamedSharding) and sharding.mesh == mesh and (
        tuple(sharding.spec) + (None,) * 4)[:4] == (tuple(spec) + (None,) * 4)[:4]


def shard_template_set(templates: Sequence, mesh: Mesh) -> list[jax.Array]:
    """Places each layer's template sheets split along N over the mesh's "sheets" axis.

    Args:
        templates: per layer, (N, h, w, C) sheets (NumPy or JAX arrays, or arrays already
            placed by this function, which are returned as they are).
        mesh: a mesh from :func:`make_mesh`.

    Returns:
        Per layer, an (N', h, w, C) array with ``NamedSharding(mesh, P("sheets"))``, N' the next
        multiple of the "sheets" axis size; the extra sheets repeat sheet 0, which changes no
        exact result (the smooth variants count it again, see :func:`sharded_anomaly_map`).

    Note:
        In a multi-host run every process must pass the same full arrays here; to give each
        process only its own part, build the arrays with
        :func:`jax.make_array_from_process_local_data` instead (``docs/scaling.md``).
    """
    mesh = _check_mesh(mesh)
    spec = P("sheets")
    out = []
    for t in templates:
        if _is_placed(t, mesh, spec):
            out.append(t)
            continue
        t = jnp.asarray(t) if not isinstance(t, np.ndarray) else t
        if t.ndim != 4 or t.shape[0] == 0:
            raise InputError(f"templates shape {t.shape}: expected (N, h, w, C) with N >= 1")
        t = _pad_axis0(t, mesh.shape["sheets"], "template sheets", warn_smooth=True)
        out.append(jax.device_put(t, NamedSharding(mesh, spec)))
    return out


def shard_queries(queries: Sequence, mesh: Mesh) -> tuple[list[jax.Array], int]:
    """Places each layer's query features split along the batch over the "queries" axis.

    Args:
        queries: per layer, (B, h, w, C) features.
        mesh: a mesh from :func:`make_mesh`.

    Returns:
        (per layer (B', h, w, C) arrays sharded ``P("queries")``, B): B' is the next multiple
        of the "queries" axis size; the extra rows repeat query 0 and are dropped by the caller.
    """
    mesh = _check_mesh(mesh)
    batch = None
    out = []
    for q in queries:
        q = jnp.asarray(q) if not isinstance(q, np.ndarray) else q
        if q.ndim != 4:
            raise InputError(f"queries shape {q.shape}: expected (B, h, w, C)")
        if batch is None:
            batch = q.shape[0]
        elif q.shape[0] != batch:
            raise InputError(f"query layers hold {batch} and {q.shape[0]} images: expected equal")
        q = _pad_axis0(q, mesh.shape["queries"], "queries", warn_smooth=False)
        out.append(jax.device_put(q, NamedSharding(mesh, P("queries"))))
    return out, int(batch)


def _min_across(distance: jax.Array, axis_name: str) -> jax.Array:
    """``pmin`` over the devices, with a gradient (``lax.pmin`` has no differentiation rule).

    The value is the minimum; the gradient reaches the device(s) holding it, shared equally
    between ties, like the gradient of ``jnp.min``.
    """
    fixed = lax.stop_gradient(distance)
    low = lax.pmin(fixed, axis_name)
    winner = fixed == low
    count = lax.psum(winner.astype(distance.dtype), axis_name)
    return low + lax.psum(jnp.where(winner, distance - fixed, 0.0), axis_name) / count


def _soft_min_across(distance: jax.Array, temperature: float, axis_name: str) -> jax.Array:
    """Combines per-device soft-minima ``1 - t * LSE(cos / t)`` into the one of all devices."""
    similarity = 1.0 - distance
    top = lax.pmax(lax.stop_gradient(similarity), axis_name)
    total = lax.psum(jnp.exp((similarity - top) / temperature), axis_name)
    return 1.0 - (top + temperature * jnp.log(total))


def _layer_maps(queries, templates, config, temperature, options):
    """The per-device body: (B_local, H, W) maps from local queries and local sheets."""
    total = None
    for q, t, (fp, bp, alpha, weight) in zip(queries, templates, config["layers"], strict=True):
        parts = []
        for patch, weight_of_part, exact_fn, smooth_fn in (
            (fp, alpha, matching.forward_hetm, matching.smooth_forward_hetm),
            (bp, 1.0 - alpha, matching.backward_hetm, matching.smooth_backward_hetm),
        ):
            if weight_of_part == 0.0:
                continue
            if temperature is None:
                local = exact_fn(q, t, patch, **options)
                combined = _min_across(local, "sheets")
            else:
                local = smooth_fn(q, t, patch, temperature, **options)
                combined = _soft_min_across(local, temperature, "sheets")
            parts.append(weight_of_part * combined)
        layer = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        layer = weight * postprocess.resize_maps(layer, config["out_size"])
        total = layer if total is None else total + layer
    return total


@functools.lru_cache(maxsize=32)
def _compiled_maps(mesh: Mesh, n_layers: int, config_key, temperature, options_key, sigma):
    config = dict(config_key)
    options = dict(options_key)

    def body(queries, templates):
        maps = _layer_maps(queries, templates, config, temperature, options)
        if sigma is None:
            return maps, maps
        return maps, postprocess.gaussian_blur(maps, sigma)

    mapped = jax.shard_map(
        body, mesh=mesh,
        in_specs=([P("queries")] * n_layers, [P("sheets")] * n_layers),
        out_specs=(P("queries"), P("queries")),
        check_vma=False,
    )
    return jax.jit(mapped)


def _config_key(n_layers, forward_patches, backward_patches, alphas, layer_weights, out_size):
    def per_layer(value, name):
        if isinstance(value, (int, float, np.integer, np.floating)) or value is None:
            return [value] * n_layers
        value = list(value)
        if len(value) != n_layers:
            raise InputError(f"{name} has {len(value)} entries: expected {n_layers} (one per "
                             "layer)")
        return value

    def patch(value):
        return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else int(value)

    layers = tuple(
        (patch(fp), patch(bp), float(a), float(w))
        for fp, bp, a, w in zip(
            per_layer(forward_patches, "forward_patches"),
            per_layer(backward_patches, "backward_patches"),
            per_layer(alphas, "alphas"),
            per_layer(1.0 if layer_weights is None else layer_weights, "layer_weights"),
            strict=True,
        )
    )
    for _, _, alpha, _ in layers:
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"alphas={alphas!r}: expected values in [0, 1]")
    if len(out_size) != 2 or not all(int(s) > 0 for s in out_size):
        raise InputError(f"out_size={out_size!r}: expected a (height, width) pair of positive ints")
    return (("layers", layers), ("out_size", (int(out_size[0]), int(out_size[1]))))


def sharded_anomaly_map(
    queries: Sequence, templates: Sequence, forward_patches, backward_patches, alphas,
    layer_weights=None, *, out_size: tuple[int, int], mesh: Mesh | None = None,
    temperature: float | None = None, sigma: float | None = None, **options,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """:func:`hetmm_jax.matching.anomaly_map` with sheets and queries split over a mesh.

    Args:
        queries: per layer, (B, h_l, w_l, C_l) query features (host or device arrays).
        templates: per layer, (N, h_l, w_l, C_l) sheets, or the output of
            :func:`shard_template_set` for this mesh (place them once and reuse them: moving
            the template set is the expensive part).
        forward_patches, backward_patches, alphas, layer_weights: as for
            :func:`hetmm_jax.matching.anomaly_map`.
        out_size: (H, W) of the maps.
        mesh: a mesh from :func:`make_mesh`; default ``make_mesh()`` (all devices on sheets).
        temperature: when given, the smooth variant.
        sigma: when given, also return the maps Gaussian-blurred with this sigma (pixels), the
            input of the image score's max (Eq. 11), computed on the devices holding them.
        options: passed to the matching functions (``templates_normalized``,
            ``max_chunk_bytes``, ``compute_dtype``, ...; ``layout`` must stay "NHWC").

    Returns:
        (B, H, W) float32 maps equal to the single-device :func:`matching.anomaly_map` (up to
        float rounding), or (maps, blurred) when ``sigma`` is given; sharded along the batch
        over the "queries" axis. Differentiable with respect to ``queries`` (``jax.grad``),
        exact and smooth, with the gradients of the single-device functions.

    Note:
        Each direction is matched in its own pass over the local sheets (the single-device
        :func:`matching.hetmm` shares one pass for both), which costs the backward window's
        area extra, e.g. 9 / 81 more for windows 3 x 3 and 9 x 9. With a sheet count that is
        not a multiple of the "sheets" axis, the padding repeats sheet 0: exact results are
        unchanged, smooth ones are those of the padded set (a shift of at most
        ``temperature * log(N' / N)``), and a warning is logged. Every device along
        "sheets" gathers the query windows for its own sheets, a cost that does not shrink with
        N / devices: splitting the sheets pays only when each device keeps many of them (a
        warning is logged below 4 per device); splitting the queries repeats nothing.
    """
    mesh = _check_mesh(make_mesh() if mesh is None else mesh)
    n_layers = len(queries)
    if n_layers == 0 or len(templates) != n_layers:
        raise InputError(
            f"{n_layers} query layers and {len(templates)} template layers: expected the same "
            "number, at least one"
        )
    if temperature is not None and not float(temperature) > 0:
        raise InputError(f"temperature={temperature}: expected a positive number")
    if sigma is not None and not float(sigma) >= 0:
        raise InputError(f"sigma={sigma}: expected a number >= 0")
    if options.get("layout", "NHWC") != "NHWC":
        raise InputError(f"layout={options['layout']!r}: the mesh path takes sheet-major "
                         "(N, h, w, C) templates only (layout 'NHWC')")
    config_key = _config_key(n_layers, forward_patches, backward_patches, alphas,
                             layer_weights, out_size)
    options_key = tuple(sorted(
        (k, jnp.dtype(v).name if k == "compute_dtype" and v is not None else v)
        for k, v in options.items()
    ))
    placed_templates = shard_template_set(templates, mesh)
    per_device = placed_templates[0].shape[0] // mesh.shape["sheets"]
    if mesh.shape["sheets"] > 1 and per_device < _FEW_SHEETS:
        log.warning(
            "each device along 'sheets' keeps only %d template sheets: every one of them "
            "repeats the gather of the query windows, so this split mostly adds work; put "
            "more devices on 'queries' (docs/scaling.md)", per_device,
        )
    placed_queries, batch = shard_queries(queries, mesh)
    run = _compiled_maps(
        mesh, n_layers, config_key, None if temperature is None else float(temperature),
        options_key, None if sigma is None else float(sigma),
    )
    maps, blurred = run(placed_queries, placed_templates)
    if sigma is None:
        return maps[:batch]
    return maps[:batch], blurred[:batch]


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) array as a NumPy array on this host."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _replicated(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=8)
def _compiled_features(features_fn, mesh: Mesh, layers: tuple[str, ...]):
    everywhere = NamedSharding(mesh, P(AXES))
    per_row = NamedSharding(mesh, P("queries"))

    def run(variables, images):
        # The backbone runs data-parallel over every device; the matching then needs each
        # image only on its mesh row.
        images = lax.with_sharding_constraint(images.astype(jnp.float32) / 255.0, everywhere)
        feats = features_fn(variables, images)
        return [lax.with_sharding_constraint(feats[name], per_row) for name in layers]

    return jax.jit(run)


def predict_sharded(detector, images, *, mesh: Mesh | None = None, batch_size: int | None = None):
    """:meth:`hetmm_jax.Detector.predict` with the backbone and the matching over a mesh.

    The images of a batch are split over all devices for the backbone and over the "queries"
    axis for the matching; the detector's templates are split over the "sheets" axis (placed
    once per mesh and cached on the detector until it is refitted or updated).

    Args:
        detector: a fitted :class:`hetmm_jax.Detector`.
        images: anything :meth:`Detector.predict` accepts.
        mesh: a mesh from :func:`make_mesh`; default ``make_mesh()``.
        batch_size: images per device step, rounded up to a multiple of the device count;
            default the detector's ``batch_size`` rounded up likewise.

    Returns:
        A :class:`hetmm_jax.Prediction` equal to ``detector.predict(images, model_maps=True)``
        (float rounding aside): scores, maps at each image's size, model maps, and labels and
        masks when the detector has a threshold.
    """
    from hetmm_jax.detector import Prediction, _load, _resize_map, _sources
    from hetmm_jax.features import resize_image

    if not hasattr(detector, "templates_"):
        raise NotFittedError("detector is not fitted yet: call fit() before predict_sharded")
    mesh = _check_mesh(make_mesh() if mesh is None else mesh)
    n_dev = mesh.devices.size
    step = int(batch_size or detector.batch_size)
    if step < 1:
        raise InputError(f"batch_size={batch_size}: expected a positive int")
    step = n_dev * math.ceil(step / n_dev)

    config = detector.config_
    layers = tuple(config["layers"])
    size = int(detector.image_size)
    extractor = detector.feature_extractor()
    cache_key = (id(detector.templates_), detector.n_templates_, mesh)
    cache = getattr(detector, "_sharded_cache", None)
    if cache is None or cache[0] != cache_key:
        templates = shard_template_set([detector.templates_[name] for name in layers], mesh)
        cache = (cache_key, templates, _replicated(extractor.variables, mesh))
        detector._sharded_cache = cache
    _, templates, variables = cache
    features = _compiled_features(extractor.features_fn, mesh, layers)
    config_key = _config_key(len(layers), config["forward_patches"],
                             config["backward_patches"], config["alphas"],
                             config["layer_weights"], (size, size))
    options = {"templates_normalized": True}
    if detector.memory_budget is not None:
        options["max_chunk_bytes"] = int(detector.memory_budget)
    matcher = _compiled_maps(mesh, len(layers), config_key, None,
                             tuple(sorted(options.items())), float(detector.sigma))

    sources = _sources(images)
    if not sources:
        raise InputError("predict_sharded: no images given")
    scores, maps, model_maps, blurred_all, paths = [], [], [], [], []
    everywhere = NamedSharding(mesh, P(AXES))
    for start in range(0, len(sources), step):
        chunk = sources[start:start + step]
        loaded = [_load(source, start + i) for i, source in enumerate(chunk)]
        batch = np.stack([resize_image(image, size) for image in loaded])
        if len(batch) < step:
            batch = np.concatenate([batch, np.zeros((step - len(batch), size, size, 3),
                                                    np.uint8)])
        feats = features(variables, jax.device_put(batch, everywhere))
        batch_maps, blurred = matcher(feats, templates)
        batch_maps = _to_host(batch_maps)[:len(chunk)]
        blurred = _to_host(blurred)[:len(chunk)]
        scores.append(blurred.max(axis=(1, 2)))
        model_maps.append(batch_maps)
        for image, map_, blur, source in zip(loaded, batch_maps, blurred, chunk, strict=True):
            maps.append(_resize_map(map_, image.shape[:2]))
            if detector.threshold_ is not None:
                blurred_all.append(_resize_map(blur, image.shape[:2]))
            paths.append(source if isinstance(source, str) else None)

    result = Prediction(scores=np.concatenate(scores).astype(np.float32), maps=maps,
                        model_maps=np.concatenate(model_maps), paths=paths)
    if detector.threshold_ is not None:
        result.labels = (result.scores >= detector.threshold_).astype(np.int64)
        result.masks = [blur >= detector.threshold_ for blur in blurred_all]
    return result


def describe(mesh: Mesh) -> dict[str, Any]:
    """A short summary of a mesh: its shape and how many processes and devices it spans."""
    devices = mesh.devices.ravel()
    return {
        "shape": dict(mesh.shape), "devices": int(devices.size),
        "processes": len({d.process_index for d in devices}),
        "platform": devices[0].platform,
    }
