"""ONNX export: qop gives onnxruntime our exact integers, qdq agrees, the onnxruntime backend trains
bit-exactly like numba, bad files and untranslatable nodes are reported clearly."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import export_to_proto
from fwdgrad.cli import main
from fwdgrad.config import TrainConfig
from fwdgrad.data.datasets import load_dataset
from fwdgrad.models.small_cnn import SmallCNN
from fwdgrad.task import model_inputs
from fwdgrad.trainer import Trainer, TrainData
from quant.convert import convert
from quant.export import ExportError, export


def session(model):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def small():
    """A small CNN (every MobileNetV2 op family but the residual add) on real Fashion-MNIST images."""
    torch.manual_seed(0)
    net = SmallCNN(1, 10, 8).eval()
    data = load_dataset("fashion-mnist", "test")
    x = model_inputs("small-cnn", data.images[:600], 28)
    return export_to_proto(net, torch.zeros(1, 1, 28, 28)), x, data.labels[:600]


@pytest.mark.parametrize("bits", ["w8a8"])
def test_qop_gives_onnxruntime_our_integers(small, bits):
    proto, x, _ = small
    graph = convert(proto, x[:200], bits=bits)
    model = export(graph, (1, 28, 28), "qop", metadata={"source_model": "small-cnn"})
    assert model.ir_version <= 10 and {o.domain for o in model.opset_import} == {""}
    assert {n.op_type for n in model.graph.node} <= {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "MaxPool",
                                                     "Reshape", "Clip", "Cast", "Sub", "ReduceSum", "Shape", "Slice",
                                                     "ReduceProd", "Add", "Mul", "Div", "Mod", "Equal", "And", "Or",
                                                     "Greater", "Identity"}
    logits_int, logits = session(model).run(["logits_int", "logits"], {"input": x})
    assert np.array_equal(logits_int, graph.forward(x))
    assert np.allclose(logits, graph.forward_float(x))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["bits"] == bits and meta["rounding"] == "half_even" and meta["source_model"] == "small-cnn"


@pytest.mark.parametrize("bits", ["w8a8", "w16a8", "w8a16"])
def test_qdq_agrees_with_the_engine(small, bits):
    proto, x, _ = small
    graph = convert(proto, x[:200], bits=bits)
    model = export(graph, (1, 28, 28), "qdq")
    assert model.opset_import[0].version == (21 if bits != "w8a8" else 13)
    logits = session(model).run(["logits"], {"input": x})[0]
    assert np.mean(logits.argmax(1) == graph.forward(x).argmax(1)) >= 0.995


def test_untranslatable_nodes_are_named(residual_net, small):
    _, x, _, proto = residual_net
    graph = convert(proto, x[:100], bits="w8a8")
    with pytest.raises(ExportError, match=r"node '.*'.*export --format qdq"):
        export(graph, (1, 8, 8), "qop")
    wide = convert(small[0], small[1][:100], bits="w16a8")
    with pytest.raises(ExportError, match="8-bit weights and activations.*w16a8"):
        export(wide, (1, 28, 28), "qop")
    logits = session(export(graph, (1, 8, 8), "qdq")).run(["logits"], {"input": x[:300]})[0]
    assert np.mean(logits.argmax(1) == graph.forward(x[:300]).argmax(1)) >= 0.99


def test_onnxruntime_backend_trains_like_numba(small, tmp_path, monkeypatch):
    monkeypatch.setenv("FWDGRAD_CACHE", str(tmp_path / "cache"))
    proto, x, y = small
    graph = convert(proto, x[:200], bits="w8a8")
    data = TrainData(x[:400], y[:400], x[400:], y[400:])
    settings = dict(bits="w8a8", selection="trady", budget="1KB", epochs=1, batch_size=100, m=2, space="real",
                    eps=0.02, lr=0.01, rgn_samples=100)
    digests = {backend: Trainer(graph, data, TrainConfig(**settings, backend=backend), tmp_path / backend).run()
               for backend in ("numba", "onnxruntime")}
    assert digests["numba"]["weights_sha256"] == digests["onnxruntime"]["weights_sha256"]
    assert digests["numba"]["final_top1"] == digests["onnxruntime"]["final_top1"]


def test_export_and_verify_a_training_run(tmp_path, monkeypatch, capsys):
    """Round trip: float ONNX -> quantize -> train -> export -> onnxruntime accuracy equals the engine's."""
    monkeypatch.setattr("fwdgrad.task.backbone", lambda model, width=1.0: SmallCNN(1, 10, 8).eval())
    run = tmp_path / "run"
    assert main(["train", "--model", "small-cnn", "--dataset", "digits", "--bits", "w8a8", "--epochs", "1",
                 "--budget", "1KB", "--m", "2", "--space", "real", "--eps", "0.02", "--lr", "0.01",
                 "--train-samples", "300", "--out", str(run)]) == 0
    for fmt in ("qop", "qdq"):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / f"{fmt}.onnx")]) == 0
        capsys.readouterr()
        assert main(["verify-onnx", str(tmp_path / f"{fmt}.onnx"), "--run", str(run), "--samples", "300",
                     "--json", str(tmp_path / f"{fmt}.json")]) == 0
        report = json.loads((tmp_path / f"{fmt}.json").read_text())
        assert report["onnxruntime_top1"] == report["engine_top1"] or fmt == "qdq"
        assert report["top1_agreement"] >= (1.0 if fmt == "qop" else 0.99)
        assert report.get("max_integer_difference", 0) == 0
    meta = {p.key: p.value for p in onnx.load(tmp_path / "qop.onnx").metadata_props}
    assert json.loads(meta["training_summary"])["epochs"] == 1

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes((tmp_path / "qop.onnx").read_bytes()[:500])
    assert main(["verify-onnx", str(truncated), "--run", str(run)]) == 2
    assert "is not a valid ONNX model" in capsys.readouterr().err
    edited = onnx.load(tmp_path / "qop.onnx")
    next(n for n in edited.graph.node if n.op_type == "QLinearConv").op_type = "QLinearConvolution"
    onnx.save(edited, tmp_path / "edited.onnx")
    assert main(["verify-onnx", str(tmp_path / "edited.onnx"), "--run", str(run)]) == 2
    assert "QLinearConvolution" in capsys.readouterr().err
