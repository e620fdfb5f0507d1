"""ImageNet backbones in Flax (NHWC, inference mode) with PyTorch weight conversion.

Every model built here takes a (B, H, W, 3) float32 image, already normalised with the mean and
std of :data:`INPUT_NORMALIZATION`, and returns a dict of the requested outputs: "layer1" to
"layer4" (feature maps at strides 4, 8, 16 and 32, output size ceil(H / stride)) and "logits"
(B, 1000). Only what the requested outputs need is computed.

Example:
    >>> import jax.numpy as jnp
    >>> from hetmm_jax import backbones
    >>> model = backbones.build("resnet18", outputs=("layer1", "layer2"))
    >>> variables = backbones.init_variables("resnet18")
    >>> out = model.apply(variables, jnp.zeros((1, 64, 64, 3)))
    >>> out["layer2"].shape
    (1, 8, 8, 128)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from hetmm_jax.backbones import efficientnet_lite, resnet
from hetmm_jax.backbones.convert import convert_state_dict, expected_layout
from hetmm_jax.errors import InputError

ARCHITECTURES = (
    "resnet18",
    "resnet50",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
)
LAYERS = ("layer1", "layer2", "layer3", "layer4")
OUTPUTS = (*LAYERS, "logits")
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# (mean, std) on [0, 1] images that each architecture's published checkpoints were trained with.
INPUT_NORMALIZATION = {
    **{arch: _IMAGENET for arch in resnet.CONFIGS},
    **{
        arch: (efficientnet_lite.INPUT_MEAN, efficientnet_lite.INPUT_STD)
        for arch in efficientnet_lite.MULTIPLIERS
    },
}

__all__ = [
    "ARCHITECTURES",
    "INPUT_NORMALIZATION",
    "LAYERS",
    "OUTPUTS",
    "STRIDES",
    "build",
    "check_arch",
    "convert_state_dict",
    "expected_layout",
    "feature_channels",
    "init_variables",
]


def check_arch(arch: str) -> str:
    """Returns ``arch`` if it is known, else raises InputError naming the choices."""
    if arch not in ARCHITECTURES:
        raise InputError(f"unknown backbone {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    return arch


def build(
    arch: str, outputs: Sequence[str] = OUTPUTS, *, dtype: Any = jnp.float32
) -> nn.Module:
    """Builds a backbone.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        outputs: names to return, a non-empty subset of :data:`OUTPUTS`.
        dtype: computation dtype, float32 or bfloat16 (parameters are always float32).

    Returns:
        A flax.linen.Module; ``module.apply(variables, x)`` maps x (B, H, W, 3) to a dict
        name -> array, "layerK" (B, ceil(H / STRIDES[name]), ceil(W / ...), C), "logits" (B, 1000).

    Raises:
        InputError: unknown architecture or output name, or no outputs.
    """
    check_arch(arch)
    outputs = tuple(outputs)
    unknown = [name for name in outputs if name not in OUTPUTS]
    if unknown or not outputs:
        raise InputError(
            f"backbone outputs {list(outputs)!r} invalid; expected a non-empty subset of "
            f"{', '.join(OUTPUTS)}"
        )
    if arch in resnet.CONFIGS:
        return resnet.ResNet(resnet.CONFIGS[arch], outputs=outputs, dtype=dtype)
    return efficientnet_lite.EfficientNetLite(arch, outputs=outputs, dtype=dtype)


def feature_channels(arch: str) -> dict[str, int]:
    """Channels of "layer1".."layer4" for ``arch`` (e.g. wide_resnet101_2: 256, 512, 1024, 2048)."""
    check_arch(arch)
    if arch in resnet.CONFIGS:
        return resnet.channels(arch)
    return efficientnet_lite.channels(arch)


def init_variables(arch: str, seed: int = 0) -> dict:
    """Random variables for ``build(arch)``, usable with any ``outputs``.

    Convolution kernels are He-normal, the classifier uniform in +-1/sqrt(fan_in), biases 0,
    BatchNorm scale 1, mean 0 and variance 1. They are drawn with NumPy from the parameter
    shapes, which is much faster than running Flax's initialiser (a full forward pass) on CPU.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        seed: seed of the NumPy generator.

    Returns:
        {"params": ..., "batch_stats": ...}, nested dicts of float32 jax arrays.
    """
    check_arch(arch)
    rng = np.random.default_rng(seed)
    variables: dict = {}
    for path, shape in expected_layout(arch).values():
        leaf = path[-1]
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        if leaf == "kernel" and len(shape) == 4:
            value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        elif leaf == "kernel":
            value = rng.uniform(-1.0, 1.0, size=shape) / np.sqrt(fan_in)
        elif leaf in ("scale", "var"):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        node = variables
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(value, jnp.float32)
    return variables
