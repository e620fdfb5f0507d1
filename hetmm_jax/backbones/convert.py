"""Conversion of PyTorch state dicts (torchvision / efficientnet_lite_pytorch keys) to Flax.

The conversion is driven by the Flax parameter tree: every leaf the Flax model expects is mapped
to exactly one PyTorch key, transformed (convolution OIHW -> HWIO, linear (out, in) -> (in, out))
and shape-checked. A state dict with a missing key, a key left over, or a wrong shape is rejected
as a whole, naming every problem; only ``num_batches_tracked`` counters (training bookkeeping,
meaningless at inference) are skipped.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hetmm_jax.backbones import efficientnet_lite, resnet
from hetmm_jax.errors import ModelFileError

log = logging.getLogger(__name__)

_IGNORED_SUFFIX = ".num_batches_tracked"
_MAX_LISTED = 8

# Flax leaf name -> PyTorch tensor name, per variable collection.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _module_name_mapper(arch: str):
    return resnet.torch_name if arch in resnet.CONFIGS else efficientnet_lite.torch_name


@functools.cache
def expected_layout(arch: str) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """The PyTorch keys an architecture needs.

    Args:
        arch: one of :data:`hetmm_jax.backbones.ARCHITECTURES`.

    Returns:
        dict torch key -> (Flax path (collection, module..., leaf), Flax shape).
    """
    from hetmm_jax.backbones import build

    model = build(arch)
    shapes = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    )
    to_torch = _module_name_mapper(arch)
    layout = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = tuple(str(entry.key) for entry in path)
        collection, modules, leaf_name = names[0], names[1:-1], names[-1]
        torch_leaf = _LEAF_NAMES[(collection, leaf_name)]
        key = ".".join([*(to_torch(m) for m in modules), torch_leaf])
        layout[key] = (names, tuple(leaf.shape))
    return layout


def _to_flax(array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    if len(flax_shape) == 4 and array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if len(flax_shape) == 2 and array.ndim == 2:
        return array.T
    return array


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" (+{more} more)" if more > 0 else "")


def convert_state_dict(
    arch: str, state_dict: Mapping[str, np.ndarray], source: str = "state dict"
) -> dict:
    """Converts a PyTorch state dict to Flax variables for ``build(arch)``.

    Args:
        arch: one of :data:`hetmm_jax.backbones.ARCHITECTURES`.
        state_dict: flat name -> array, in torchvision's key layout (``conv1.weight``,
            ``layer1.0.bn1.running_mean``, ``fc.weight``) for the ResNet family, or
            efficientnet_lite_pytorch's (``_conv_stem.weight``, ``_blocks.0._bn1.weight``,
            ``_fc.weight``) for EfficientNet-Lite. Arrays are converted to float32.
        source: how to name the state dict in error messages (e.g. its file path).

    Returns:
        {"params": ..., "batch_stats": ...}, nested dicts of float32 jax arrays.

    Raises:
        ModelFileError: a key is missing or unexpected, a shape differs, or a tensor is not
            numeric; the message lists every such key.
        hetmm_jax.errors.InputError: ``arch`` is unknown.
    """
    from hetmm_jax.backbones import check_arch

    check_arch(arch)
    layout = expected_layout(arch)
    ignored = [key for key in state_dict if key.endswith(_IGNORED_SUFFIX)]
    if ignored:
        log.debug("%s: ignoring %d num_batches_tracked counters", source, len(ignored))
    given = set(state_dict) - set(ignored)
    missing = sorted(set(layout) - given)
    unexpected = sorted(given - set(layout))

    bad = []
    converted = {}
    for key in sorted(given & set(layout)):
        path, flax_shape = layout[key]
        array = np.asarray(state_dict[key])
        if not np.issubdtype(array.dtype, np.floating):
            bad.append(f"{key}: dtype {array.dtype}, expected floating point")
            continue
        value = _to_flax(array, flax_shape)
        if tuple(value.shape) != flax_shape:
            bad.append(f"{key}: shape {tuple(array.shape)} does not fit {arch}")
            continue
        converted[path] = value.astype(np.float32)

    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys [{_listed(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{_listed(unexpected)}]")
        if bad:
            parts.append(f"mismatched tensors [{_listed(bad)}]")
        raise ModelFileError(f"{source} is not a {arch} checkpoint: " + "; ".join(parts))

    variables: dict = {}
    for path, value in converted.items():
        node = variables
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(value)
    return variables
