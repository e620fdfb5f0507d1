"""torchvision's ResNet family in Flax: ResNet-18/50 and WideResNet-50-2/101-2, inference only.

The layout follows torchvision (v1.5 bottleneck: the stride sits on the 3x3 convolution) so that
its checkpoints convert one to one; see :func:`hetmm_jax.backbones.convert.convert_state_dict`.
Padding is written out symmetrically as PyTorch applies it, and max pooling pads with -inf, so
results match torchvision to float32 rounding.

Outputs (NHWC), for an input of size (B, H, W, 3):

==========  ======  =====================  =====================
name        stride  ResNet-18 channels     ResNet-50 / Wide channels
==========  ======  =====================  =====================
layer1      4       64                     256
layer2      8       128                    512
layer3      16      256                    1024
layer4      32      512                    2048
logits      --      (B, 1000)              (B, 1000)
==========  ======  =====================  =====================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

STAGES = ("layer1", "layer2", "layer3", "layer4")
BN_EPSILON = 1e-5


@dataclass(frozen=True)
class ResNetConfig:
    """Shape of one ResNet variant.

    Attributes:
        bottleneck: True for the 1x1-3x3-1x1 bottleneck block, False for the basic 3x3-3x3 block.
        blocks: number of blocks in layer1..layer4.
        width_per_group: inner width of a bottleneck's first stage (64 plain, 128 "wide").
    """

    bottleneck: bool
    blocks: tuple[int, int, int, int]
    width_per_group: int = 64


CONFIGS = {
    "resnet18": ResNetConfig(bottleneck=False, blocks=(2, 2, 2, 2)),
    "resnet50": ResNetConfig(bottleneck=True, blocks=(3, 4, 6, 3)),
    "wide_resnet50_2": ResNetConfig(bottleneck=True, blocks=(3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": ResNetConfig(bottleneck=True, blocks=(3, 4, 23, 3), width_per_group=128),
}


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        name=name,
    )


def _batch_norm(name: str, dtype: Any) -> nn.BatchNorm:
    # Frozen statistics: the backbone is a fixed feature extractor, never trained here.
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and an identity (or 1x1 projection) shortcut."""

    planes: int
    stride: int
    downsample: bool
    dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x):
        shortcut = x
        y = _conv(self.planes, 3, self.stride, "conv1", self.dtype)(x)
        y = nn.relu(_batch_norm("bn1", self.dtype)(y))
        y = _conv(self.planes, 3, 1, "conv2", self.dtype)(y)
        y = _batch_norm("bn2", self.dtype)(y)
        if self.downsample:
            shortcut = _conv(self.planes, 1, self.stride, "downsample_0", self.dtype)(x)
            shortcut = _batch_norm("downsample_1", self.dtype)(shortcut)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as torchvision v1.5), 1x1 expand by 4, plus shortcut."""

    planes: int
    stride: int
    downsample: bool
    width_per_group: int = 64
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x):
        width = int(self.planes * (self.width_per_group / 64.0))
        shortcut = x
        y = _conv(width, 1, 1, "conv1", self.dtype)(x)
        y = nn.relu(_batch_norm("bn1", self.dtype)(y))
        y = _conv(width, 3, self.stride, "conv2", self.dtype)(y)
        y = nn.relu(_batch_norm("bn2", self.dtype)(y))
        y = _conv(self.planes * self.expansion, 1, 1, "conv3", self.dtype)(y)
        y = _batch_norm("bn3", self.dtype)(y)
        if self.downsample:
            shortcut = _conv(
                self.planes * self.expansion, 1, self.stride, "downsample_0", self.dtype
            )(x)
            shortcut = _batch_norm("downsample_1", self.dtype)(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """A torchvision-layout ResNet returning the requested stage outputs and/or logits.

    Attributes:
        config: the variant, see :data:`CONFIGS`.
        outputs: names to return, a subset of "layer1".."layer4", "logits". Stages after the
            deepest requested one are not computed.
        num_classes: size of the classifier.
        dtype: computation dtype (parameters stay float32).
    """

    config: ResNetConfig
    outputs: Sequence[str] = (*STAGES, "logits")
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """Runs the network.

        Args:
            x: (B, H, W, 3) float image, already normalised.

        Returns:
            dict name -> array: "layerK" (B, ceil(H / 2**(K+1)), ..., C_K), "logits" (B, 1000).
        """
        wanted = set(self.outputs)
        last_stage = 4 if "logits" in wanted else max(
            STAGES.index(name) + 1 for name in wanted if name in STAGES
        )
        result = {}

        x = x.astype(self.dtype)
        x = nn.Conv(
            64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
            dtype=self.dtype, name="conv1",
        )(x)
        x = nn.relu(_batch_norm("bn1", self.dtype)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        block_cls = Bottleneck if self.config.bottleneck else BasicBlock
        in_channels = 64
        for stage in range(last_stage):
            planes = 64 * 2**stage
            for index in range(self.config.blocks[stage]):
                stride = 2 if (index == 0 and stage > 0) else 1
                out_channels = planes * block_cls.expansion
                kwargs = {"width_per_group": self.config.width_per_group}
                x = block_cls(
                    planes=planes,
                    stride=stride,
                    downsample=(stride != 1 or in_channels != out_channels),
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{index}",
                    **(kwargs if self.config.bottleneck else {}),
                )(x)
                in_channels = out_channels
            if STAGES[stage] in wanted:
                result[STAGES[stage]] = x

        if "logits" in wanted:
            pooled = jnp.mean(x, axis=(1, 2))
            result["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(pooled)
        return result


def channels(arch: str) -> dict[str, int]:
    """Channel count of each stage output of a ResNet-family architecture."""
    config = CONFIGS[arch]
    expansion = 4 if config.bottleneck else 1
    return {name: 64 * 2**i * expansion for i, name in enumerate(STAGES)}


def torch_name(component: str) -> str:
    """Maps one Flax module name to its torchvision state-dict name ("layer1_0" -> "layer1.0")."""
    head, sep, tail = component.rpartition("_")
    if sep and tail.isdigit():
        return f"{head}.{tail}"
    return component
