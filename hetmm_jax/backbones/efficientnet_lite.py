"""EfficientNet-Lite0/1/2 in Flax, inference only, in the layout of ``efficientnet_lite_pytorch``.

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excite, and the stem
(32 channels), the first and last block groups' repeats and the head (1280 channels) are not
scaled. Convolutions use TensorFlow "same" padding (output size ceil(in / stride), the odd pad
pixel at the bottom / right), computed from the actual input size, so any input size works.
BatchNorm uses eps 1e-3 with frozen statistics.

Which block outputs are the named feature maps: the network has seven block groups; the output
of the last block at each stride is taken, and for stride 32 that is the last block *before* the
1x1 head convolution (the head is a classifier-specific 1280-channel expansion, and the features
before it are the network's own representation at that stride):

==========  ======  ============  =======  =======  =======
name        stride  block group   Lite0    Lite1    Lite2
==========  ======  ============  =======  =======  =======
layer1      4       2             24       24       24
layer2      8       3             40       40       48
layer3      16      5             112      112      120
layer4      32      7 (pre-head)  320      320      352
logits      --      head + fc     1000     1000     1000
==========  ======  ============  =======  =======  =======

Input normalisation: the TensorFlow Lite models were trained on (pixel - 127) / 128, i.e. mean
127/255 and std 128/255 on a [0, 1] image; see :data:`INPUT_MEAN` and :data:`INPUT_STD`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

STAGES = ("layer1", "layer2", "layer3", "layer4")
BN_EPSILON = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3

# (repeats, kernel, stride, expand ratio, input channels, output channels) of the seven block
# groups before width / depth scaling, as in TensorFlow's efficientnet_lite_builder.
BASE_GROUPS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Index (in BASE_GROUPS) of the group whose last block gives each named feature map.
STAGE_GROUPS = {"layer1": 1, "layer2": 2, "layer3": 4, "layer4": 6}

# (width multiplier, depth multiplier) per variant.
MULTIPLIERS = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scales a channel count by ``width`` and rounds it to a multiple of ``divisor``."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: kernel size, stride, expand ratio, input and output channels."""

    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


def block_specs(arch: str) -> tuple[tuple[BlockSpec, ...], ...]:
    """The blocks of each of the seven groups of a Lite variant, after width / depth scaling."""
    width, depth = MULTIPLIERS[arch]
    groups = []
    for index, (repeats, kernel, stride, expand, cin, cout) in enumerate(BASE_GROUPS):
        fixed = index in (0, len(BASE_GROUPS) - 1)
        repeats = repeats if fixed else int(math.ceil(depth * repeats))
        cin = STEM_CHANNELS if index == 0 else round_filters(cin, width)
        cout = round_filters(cout, width)
        blocks = [BlockSpec(kernel, stride, expand, cin, cout)]
        blocks += [BlockSpec(kernel, 1, expand, cout, cout)] * (repeats - 1)
        groups.append(tuple(blocks))
    return tuple(groups)


def channels(arch: str) -> dict[str, int]:
    """Channel count of each named stage output of a Lite variant."""
    groups = block_specs(arch)
    return {name: groups[group][-1].out_channels for name, group in STAGE_GROUPS.items()}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding of one spatial axis: output ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _batch_norm(name: str, dtype: Any) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=dtype, name=name)


def _conv(features, kernel, name, dtype, stride=1, groups=1):
    if kernel == 1 and stride == 1:
        return nn.Conv(features, (1, 1), use_bias=False, dtype=dtype, name=name)
    return SameConv(features, kernel, stride, groups, dtype, name=name)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """Depthwise convolution as a sum of k*k shifted, strided slices times per-channel weights.

    XLA's grouped convolution (``feature_group_count`` = channels) is 4-10x slower on CPU than
    this formulation, which XLA fuses into one elementwise loop; the result is the same up to
    float rounding (summation order).

    Args:
        x: (B, H, W, C) input.
        kernel: (k, k, 1, C) weights (HWIO with one input channel per group).
        stride: spatial stride.
        padding: ((top, bottom), (left, right)) zero padding.

    Returns:
        (B, H_out, W_out, C).
    """
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    size_h, size_w = kernel.shape[:2]
    out_h = (x.shape[1] - size_h) // stride + 1
    out_w = (x.shape[2] - size_w) // stride + 1
    total = None
    for i in range(size_h):
        for j in range(size_w):
            window = lax.slice(
                x,
                (0, i, j, 0),
                (x.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1,
                 x.shape[3]),
                (1, stride, stride, 1),
            )
            term = window * kernel[i, j, 0]
            total = term if total is None else total + term
    return total


class SameConv(nn.Module):
    """Bias-free convolution with TensorFlow "same" padding, ``groups`` > 1 for depthwise.

    The padding depends on the input size, so it is computed at call time from the (static)
    shape; the kernel is a direct parameter (HWIO) so the tree mirrors PyTorch's one weight.
    """

    features: int
    kernel: int
    stride: int = 1
    groups: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.kernel, self.kernel, in_features // self.groups, self.features),
            jnp.float32,
        )
        padding = tuple(same_padding(size, self.kernel, self.stride) for size in x.shape[1:3])
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if self.groups > 1 and self.groups == in_features == self.features:
            return depthwise_conv(x, kernel, self.stride, padding)
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.stride, self.stride),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 project, skip when shapes allow."""

    spec: BlockSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        spec = self.spec
        hidden = spec.in_channels * spec.expand
        y = x
        if spec.expand != 1:
            y = _conv(hidden, 1, "expand_conv", self.dtype)(y)
            y = nn.relu6(_batch_norm("bn0", self.dtype)(y))
        y = _conv(hidden, spec.kernel, "depthwise_conv", self.dtype, spec.stride, hidden)(y)
        y = nn.relu6(_batch_norm("bn1", self.dtype)(y))
        y = _conv(spec.out_channels, 1, "project_conv", self.dtype)(y)
        y = _batch_norm("bn2", self.dtype)(y)
        if spec.stride == 1 and spec.in_channels == spec.out_channels:
            y = y + x
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite returning the requested stage outputs and/or logits.

    Attributes:
        arch: "efficientnet_lite0", "efficientnet_lite1" or "efficientnet_lite2".
        outputs: names to return, a subset of "layer1".."layer4", "logits". Block groups after
            the deepest requested stage are not computed.
        num_classes: size of the classifier.
        dtype: computation dtype (parameters stay float32).
    """

    arch: str
    outputs: Sequence[str] = (*STAGES, "logits")
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """Runs the network.

        Args:
            x: (B, H, W, 3) float image, already normalised (see :data:`INPUT_MEAN`).

        Returns:
            dict name -> array: "layerK" (B, ceil(H / 2**(K+1)), ..., C_K), "logits" (B, 1000).
        """
        wanted = set(self.outputs)
        if "logits" in wanted:
            last_group = len(BASE_GROUPS) - 1
        else:
            last_group = max(STAGE_GROUPS[name] for name in wanted if name in STAGE_GROUPS)
        group_to_stage = {group: name for name, group in STAGE_GROUPS.items()}
        result = {}

        x = x.astype(self.dtype)
        x = _conv(STEM_CHANNELS, 3, "conv_stem", self.dtype, stride=2)(x)
        x = nn.relu6(_batch_norm("bn0", self.dtype)(x))

        index = 0
        for group, blocks in enumerate(block_specs(self.arch)[: last_group + 1]):
            for spec in blocks:
                x = MBConvBlock(spec, dtype=self.dtype, name=f"blocks_{index}")(x)
                index += 1
            name = group_to_stage.get(group)
            if name in wanted:
                result[name] = x

        if "logits" in wanted:
            x = _conv(HEAD_CHANNELS, 1, "conv_head", self.dtype)(x)
            x = nn.relu6(_batch_norm("bn1", self.dtype)(x))
            pooled = jnp.mean(x, axis=(1, 2))
            result["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(pooled)
        return result


def torch_name(component: str) -> str:
    """Maps one Flax module name to its efficientnet_lite_pytorch name ("blocks_3" -> "_blocks.3",
    "bn0" -> "_bn0")."""
    if component.startswith("blocks_"):
        return "_blocks." + component.split("_", 1)[1]
    return "_" + component
