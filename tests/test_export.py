"""ONNX export: qop gives onnxruntime the engine's exact integers, qdq agrees with it, the onnxruntime
backend trains to the numba backend's integers, and bad graphs and bad files are reported clearly."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st

from fwdgrad.cli import main
from fwdgrad.config import TrainConfig
from fwdgrad.deploy import session_options
from fwdgrad.data.split import TrainData
from fwdgrad.trainer import Trainer
from quant.convert import BIT_CONFIGS, convert
from quant.export import ExportError, export, export_segment, qdq_nodes_against_engine
from quant.graph import QGraph
from quant.ops import Node, QAdd, QAvgPool, QConcat, QConv, QLinear, QMaxPool, QReshape, int8_gemm
from quant.tensor import QParams, quantize, weight_params

from test_kernels import conv_cases, ints, pool_cases

# the operators docs/export.md promises, and nothing else
QOP_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "Cast", "Sub", "Mul", "Add", "Div", "Clip",
           "MaxPool", "Reshape", "Concat", "Unsqueeze", "Squeeze", "Identity"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "Add", "Clip", "MaxPool", "AveragePool",
           "GlobalAveragePool", "Reshape", "Concat", "Identity",
           "Cast", "Mul"}  # int64 biases (16-bit operands): Cast/Mul on constants, which runtimes fold


# onnxruntime's int8 x int8 kernels compute the engine's arithmetic only with int8 dot-product instructions
INT8_DOT_PRODUCTS = int8_gemm.has_int8_dot_products()


def session(model, level="basic"):
    """An onnxruntime session at one of verify-onnx's levels (fwdgrad.deploy.OPTIMIZATION_LEVELS)."""
    return ort.InferenceSession(model.SerializeToString(), session_options(level), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def graphs(residual_net):
    """The residual net (every op family: grouped/depthwise/pointwise conv, fused ReLU/ReLU6, residual add,
    concat of differently scaled tensors, max/average/global pooling, flatten, linear) at every width."""
    _, x, _, proto = residual_net
    return {bits: convert(proto, x[:200], bits=bits) for bits in BIT_CONFIGS}


def perturbed(graph, seed=0):
    """Replacement weights as the trainer keeps them (key -> integers), off the stored ones."""
    rng = np.random.default_rng(seed)
    weights = {}
    for n in graph.weighted_nodes():
        limit = n.w_params.qmax
        step = rng.integers(-3, 4, n.weight.shape) * (1 if n.w_params.bits == 8 else 256)
        weights[n.weight_key] = np.clip(n.weight.astype(np.int64) + step, -limit, limit).astype(n.weight.dtype)
        weights[n.bias_key] = (n.bias + rng.integers(-50, 51, n.bias.shape)).astype(n.bias.dtype)
    return weights


# ---- qop: exact -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", ["w8a8", "w16a8"])
def test_qop_gives_onnxruntime_the_engines_integers(graphs, residual_net, bits):
    _, x, _, _ = residual_net
    graph, weights = graphs[bits], perturbed(graphs[bits])
    model = export(graph, (1, 8, 8), "qop", weights, metadata={"source_model": "residual-net"})
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10 and [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    assert {n.op_type for n in model.graph.node} <= QOP_OPS
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits", "logits_int"]
    logits, logits_int = session(model).run(["logits", "logits_int"], {"input": x})
    expected = graph.forward(x, weights=weights)
    assert logits_int.dtype == np.int8 and np.array_equal(logits_int, expected)
    assert np.array_equal(logits, graph.forward_float(x, weights=weights))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta | {"bits": bits, "rounding": "half_even", "format": "qop", "source_model": "residual-net"} == meta


@pytest.mark.parametrize("scales", ["float", "pow2"])
def test_qop_is_exact_at_onnxruntimes_full_optimization_level(residual_net, scales):
    """What a default onnxruntime session computes: its fusions (QLinearAdd, layout changes) must not touch
    the integers. Power-of-two scales make exact ties common, where a fused add would round its own way."""
    _, x, _, proto = residual_net
    graph = convert(proto, x[:200], scales=scales)
    weights = perturbed(graph)
    model = export(graph, (1, 8, 8), "qop", weights)
    theirs = session(model, "all").run(["logits_int"], {"input": x})[0]
    assert np.array_equal(theirs, graph.forward(x, weights=weights))


def layer_params(rng, w_shape, wbits):
    x_params = QParams(rng.uniform(0.005, 0.05), int(rng.integers(-128, 128)), 8)
    out_params = QParams(rng.uniform(0.02, 0.5), int(rng.integers(-128, 128)), 8)
    w_float = rng.normal(0, 1, w_shape).astype(np.float32)
    w_params = weight_params(w_float, wbits)
    bias = rng.integers(-5000, 5000, w_shape[0]).astype(np.int32 if wbits == 8 else np.int64)
    clamp = (out_params.zero_point, 127) if rng.random() < 0.3 else None  # a fused ReLU, sometimes
    return dict(in_params=x_params, weight=quantize(w_float, w_params), w_params=w_params, bias=bias, clamp=clamp,
                out_params=out_params)


def onnxruntime_equals_numba(graph: QGraph, env: dict, start: str, weights=None):
    """The node(s) from ``start`` on integer inputs ``env``: exported segment in onnxruntime vs numba."""
    ours = graph.forward(dict(env), start=start, weights=weights)
    theirs = graph.forward(dict(env), start=start, weights=weights, backend="onnxruntime")
    assert theirs.dtype == ours.dtype and np.array_equal(theirs, ours)


@settings(max_examples=30, deadline=None)
@given(conv_cases(), st.sampled_from([8, 16]), st.integers(0, 2 ** 32 - 1))
def test_qop_conv_is_exact(case, wbits, seed):
    """QLinearConv (8-bit weights) and the split ConvInteger pair (16-bit), weights as graph inputs."""
    x_shape, w_shape, geometry = case
    rng = np.random.default_rng(seed)
    p = layer_params(rng, w_shape, wbits)
    graph = QGraph([QConv("conv", ["x"], "y", geometry=geometry, **p)], "x", p["in_params"], "y")
    onnxruntime_equals_numba(graph, {"x": ints(rng, x_shape, 8)}, "conv")


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 600), st.integers(1, 10), st.sampled_from([8, 16]),
       st.integers(0, 2 ** 32 - 1))
def test_qop_linear_is_exact(n, k, o, wbits, seed):
    rng = np.random.default_rng(seed)
    p = layer_params(rng, (o, k), wbits)
    graph = QGraph([QLinear("fc", ["x"], "y", **p)], "x", p["in_params"], "y")
    onnxruntime_equals_numba(graph, {"x": ints(rng, (n, k), 8)}, "fc")


def retagged(name: str, params: QParams) -> QReshape:
    """A no-op node that gives tensor ``name`` its own params: two differently scaled inputs for one op."""
    return QReshape(name, ["x"], name, params, shape=(0, 0, 0, 0))


def activation(rng) -> QParams:
    return QParams(rng.uniform(0.01, 0.3), int(rng.integers(-128, 128)), 8)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 9), st.booleans(), st.integers(0, 2 ** 32 - 1))
def test_qop_add_and_concat_are_exact(n, c, hw, same_scale, seed):
    rng = np.random.default_rng(seed)
    pa, pb = activation(rng), activation(rng)
    py = pa if same_scale else activation(rng)
    nodes = [retagged("a", pa), retagged("b", pb),
             QAdd("add", ["a", "b"], "s", py, a_params=pa, b_params=pb, clamp=(py.zero_point, 127)),
             QConcat("cat", ["a", "s", "b"], "y", py, in_params=[pa, py, pb])]
    graph = QGraph(nodes, "x", pa, "y")
    onnxruntime_equals_numba(graph, {t: ints(rng, (n, c, hw, hw), 8) for t in ("a", "b")}, "add")


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(-8, -2), min_size=3, max_size=3), st.integers(0, 2 ** 32 - 1))
def test_qop_add_of_power_of_two_scales_is_exact_at_every_optimization_level(exponents, seed):
    """Power-of-two scales make exact ties common (half of ``a + b / 2``): onnxruntime's full level must not
    fuse the add into its contrib QLinearAdd, which rounds them its own way."""
    rng = np.random.default_rng(seed)
    pa, pb, py = (QParams(2.0 ** e, int(rng.integers(-128, 128)), 8) for e in exponents)
    graph = QGraph([retagged("a", pa), retagged("b", pb), QAdd("add", ["a", "b"], "y", py, a_params=pa, b_params=pb)],
                   "x", pa, "y")
    env = {t: ints(rng, (2, 4, 6, 6), 8) for t in ("a", "b")}
    model = export_segment(graph, 2, 3, {t: (1, 4, 6, 6) for t in env}, "qop")
    ours = graph.forward(dict(env), start="add")
    for level in ("basic", "all"):
        assert np.array_equal(session(model, level).run(None, env)[0], ours)


@settings(max_examples=30, deadline=None)
@given(pool_cases(), st.integers(0, 2 ** 32 - 1))
def test_qop_pools_are_exact(case, seed):
    """Max pooling, windowed average pooling (with and without padding counted) and global pooling."""
    shape, geometry = case
    rng = np.random.default_rng(seed)
    p = activation(rng)
    for node in (QAvgPool("pool", ["x"], "y", p, geometry=geometry), QMaxPool("pool", ["x"], "y", p, geometry=geometry),
                 QAvgPool("pool", ["x"], "y", p)):
        onnxruntime_equals_numba(QGraph([node], "x", p, "y"), {"x": ints(rng, shape, 8)}, "pool")


# ---- qdq: agreement -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BIT_CONFIGS)
def test_qdq_agrees_with_the_engine(graphs, residual_net, bits):
    _, x, _, _ = residual_net
    graph, weights = graphs[bits], perturbed(graphs[bits])
    model = export(graph, (1, 8, 8), "qdq", weights)
    onnx.checker.check_model(model, full_check=True)
    assert (model.opset_import[0].version, model.ir_version) == ((13, 8) if bits == "w8a8" else (21, 10))
    assert {n.op_type for n in model.graph.node} <= QDQ_OPS
    logits = session(model).run(["logits"], {"input": x})[0]
    ours = graph.forward(x, weights=weights)
    assert np.mean(logits.argmax(1) == ours.argmax(1)) >= 0.995
    steps = np.abs(quantize(logits, graph.output_params).astype(int) - ours)
    assert np.mean(steps <= 1) > 0.9 and steps.max() <= 10  # float between the quantizers: a few steps at most


@pytest.mark.parametrize("bits", ["w8a8", "w8a16"])
def test_qdq_differs_from_the_engine_only_at_float_near_ties(graphs, residual_net, bits):
    """Node by node, fed the engine's own integers, the qdq file's float arithmetic lands on the engine's
    grid point except where float rounding decides a near-tie: one step, rarely. (Whole-graph differences
    are these flips propagated.)"""
    _, x, _, _ = residual_net
    graph = graphs[bits]
    differing = total = 0
    for node, model, theirs, ours in qdq_nodes_against_engine(graph, x[:64]):
        onnx.checker.check_model(model, full_check=True)
        assert theirs.dtype == ours.dtype
        steps = np.abs(theirs.astype(np.int64) - ours)
        assert steps.max() <= 1, node.name
        differing, total = differing + np.count_nonzero(steps), total + steps.size
    assert differing / total < 1e-3


@pytest.mark.parametrize("bits", BIT_CONFIGS)
def test_qdq_of_power_of_two_scales(residual_net, bits):
    """With every scale a power of two, the float arithmetic between the quantizers is exact wherever its
    sums fit float32's 24 bits: the qdq file gives the engine's integers for 8-bit weights and activations,
    node by node and end to end; wider operands may exceed 2**24 and round."""
    _, x, _, proto = residual_net
    graph = convert(proto, x[:200], bits=bits, scales="pow2")
    weights = perturbed(graph)
    model = export(graph, (1, 8, 8), "qdq", weights)
    assert {p.key: p.value for p in model.metadata_props}["scales"] == "pow2"
    theirs = quantize(session(model).run(["logits"], {"input": x})[0], graph.output_params)
    ours = graph.forward(x, weights=weights)
    steps = np.abs(theirs.astype(np.int64) - ours)
    if bits == "w8a8":
        assert steps.max() == 0
        assert all(np.array_equal(t, o) for _, _, t, o in qdq_nodes_against_engine(graph, x[:64]))
    else:
        assert np.mean(theirs.argmax(1) == ours.argmax(1)) >= 0.995


@pytest.mark.skipif(not INT8_DOT_PRODUCTS, reason="no VNNI / AMX here")
@pytest.mark.parametrize("bits", BIT_CONFIGS)
def test_qdq_in_onnxruntimes_int8_kernels(graphs, residual_net, bits):
    """verify-onnx --optimization int8 lets onnxruntime fuse the qdq file's 8-bit groups into its int8 x int8
    kernels, whose arithmetic (int32 sums, float32 multiplier, half to even) is the engine's: w8a8 gives the
    engine's integers whatever the scales. 16-bit tensors have no such kernels and stay float: as at basic."""
    _, x, _, _ = residual_net
    graph, weights = graphs[bits], perturbed(graphs[bits])
    model = export(graph, (1, 8, 8), "qdq", weights)
    theirs = quantize(session(model, "int8").run(["logits"], {"input": x})[0], graph.output_params)
    ours = graph.forward(x, weights=weights)
    if bits == "w8a8":
        assert np.array_equal(theirs, ours)
    else:
        assert np.mean(theirs.argmax(1) == ours.argmax(1)) >= 0.995


@pytest.mark.skipif(not INT8_DOT_PRODUCTS, reason="no VNNI / AMX here")
def test_mobilenetv2_qdq_in_onnxruntimes_int8_kernels():
    """ImageNet MobileNetV2, w8a8 with float scales and equalized activations, on real photo crops: in
    onnxruntime's int8 kernels (all 52 convs, 10 adds, the pool and the classifier fused) the qdq file gives
    the engine's integers; its default session ("all") does not (it rewrites 37 convs to uint8 kernels and
    leaves 15 convs and the adds in float: a quarter of the logits a few steps off, measured)."""
    from fwdgrad.data.photos import real_photos
    from fwdgrad.models.zoo import model_onnx

    path = model_onnx("mobilenetv2", resolution=96)
    graph = convert(path, real_photos(32, 96, seed=1), bits="w8a8")
    x = real_photos(16, 96, seed=0)
    model = export(graph, x.shape[1:], "qdq")
    ours = graph.forward(x)
    for level, exact in (("int8", True), ("all", False)):
        theirs = quantize(session(model, level).run(["logits"], {"input": x})[0], graph.output_params)
        assert np.array_equal(theirs, ours) == exact, level


# ---- what cannot be exported --------------------------------------------------------------------------

def test_untranslatable_graphs_are_named(graphs):
    with pytest.raises(ExportError, match=r"16-bit \(w8a16\).*int16.*--format qdq"):
        export(graphs["w8a16"], (1, 8, 8), "qop")
    away = convert_like(graphs["w8a8"], rounding="half_away")
    with pytest.raises(ExportError, match="half_even.*half_away.*--format qdq"):
        export(away, (1, 8, 8), "qop")

    class Softmax(Node):
        op_type = "Softmax"

        def run(self, kernels, xs, rounding, overrides=None):
            return xs[0]

    g = graphs["w8a8"]
    odd = QGraph(g.nodes + [Softmax("/softmax", [g.output_name], "probs", g.output_params)], g.input_name,
                 g.input_params, "probs")
    for fmt in ("qop", "qdq"):
        with pytest.raises(ExportError, match=f"node '/softmax' \\(Softmax\\) has no {fmt} form"):
            export(odd, (1, 8, 8), fmt)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(g, (1, 8, 8), "tflite")


def convert_like(graph: QGraph, **changes) -> QGraph:
    fields = dict(nodes=graph.nodes, input_name=graph.input_name, input_params=graph.input_params,
                  output_name=graph.output_name, rounding=graph.rounding, bits=graph.bits)
    return QGraph(**(fields | changes))


# ---- the onnxruntime training backend -----------------------------------------------------------------

@pytest.mark.parametrize("bits", ["w8a8", "w16a8"])
def test_onnxruntime_backend_prefix_and_suffix_are_numbas(graphs, residual_net, bits):
    _, x, _, _ = residual_net
    graph, weights = graphs[bits], perturbed(graphs[bits], seed=1)
    for node in graph.nodes[::3]:
        theirs = graph.prefix(x[:64], until=node.name, weights=weights, backend="onnxruntime")
        ours = graph.prefix(x[:64], until=node.name, weights=weights)
        assert sorted(theirs) == sorted(ours) and all(np.array_equal(theirs[t], ours[t]) for t in ours)
        onnxruntime_equals_numba(graph, theirs, node.name, weights)
    with pytest.raises(ValueError, match="half_even"):
        graph.forward(x[:4], backend="onnxruntime", rounding="half_away")


@pytest.mark.parametrize("bits", ["w8a8", "w16a8"])
def test_onnxruntime_backend_bakes_the_layers_that_do_not_vary(graphs, residual_net, bits):
    """Only ``varying`` layers are session inputs; the others are initializers of their current integers.
    A new array for a baked layer (a trainer's next selection period) gets a new session, never a stale one."""
    _, x, _, _ = residual_net
    graph = graphs[bits]
    layers = graph.weighted_nodes()
    varying = frozenset({layers[-1].weight_key, layers[-1].bias_key})
    for seed in (1, 2):  # two weight sets: the baked layers' arrays differ, so do the sessions
        weights = perturbed(graph, seed=seed)
        for s in (3, 4):  # the varying layer moves from call to call within one session
            weights = weights | {layers[-1].weight_key: perturbed(graph, seed=s)[layers[-1].weight_key]}
            theirs = graph.forward(x[:32], weights=weights, backend="onnxruntime", varying=varying)
            assert np.array_equal(theirs, graph.forward(x[:32], weights=weights))
    model = export_segment(graph, 0, len(graph.nodes), {graph.input_name: (1,) + x.shape[1:]}, varying=varying)
    assert {i.name for i in model.graph.input} == {graph.input_name} | varying


@pytest.mark.parametrize("bits", ["w8a8", "w16a8"])
def test_training_on_onnxruntime_ends_on_numbas_integers(residual_net, graphs, tmp_path, monkeypatch, bits):
    monkeypatch.setenv("FWDGRAD_CACHE", str(tmp_path / "cache"))
    _, x, y, _ = residual_net
    data = TrainData(x[:400], y[:400], x[1500:1700], y[1500:1700])
    settings = dict(model="small-cnn", dataset="digits", bits=bits, selection="trady", budget="600B", epochs=1,
                    batch_size=100, m=2, eps=1.0, lr=1.0, rgn_samples=128)
    runs = {backend: Trainer(graphs[bits], data, TrainConfig(**settings, backend=backend), tmp_path / backend).run()
            for backend in ("numba", "onnxruntime")}
    assert runs["onnxruntime"]["weights_sha256"] == runs["numba"]["weights_sha256"]
    assert runs["onnxruntime"]["final_top1"] == runs["numba"]["final_top1"]


# ---- the command line: train -> export -> verify ------------------------------------------------------

def digits_cnn():
    """SmallCNN (width 8) trained for an epoch on the digits training split: a backbone whose features
    carry the classes (a random one gives chance-level probes), in seconds instead of the zoo's minute."""
    import torch
    from torch import nn

    from fwdgrad.data.datasets import load_dataset
    from fwdgrad.models.small_cnn import SmallCNN
    from fwdgrad.task import model_inputs

    train = load_dataset("digits", "train")
    x, y = torch.from_numpy(model_inputs("small-cnn", train.images, 28)), torch.from_numpy(train.labels).long()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (as in conftest)
    net = SmallCNN(1, 10, 8)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for i in range(0, len(x), 64):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64]).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def digits_backbone():
    return digits_cnn()


def train_through_cli(root, backbone, *flags):
    """A short forward-gradient run of that backbone with a new probe head, through the command line."""
    import copy

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FWDGRAD_CACHE", str(root / "cache"))
        patch.setattr("fwdgrad.task.backbone", lambda model, width=1.0: copy.deepcopy(backbone))
        assert main(["train", "--model", "small-cnn", "--dataset", "digits", "--bits", "w8a8", "--epochs", "1",
                     "--budget", "1KB", "--m", "2", "--space", "real", "--eps", "0.02", "--lr", "0.01",
                     "--train-samples", "300", "--test-samples", "200", "--out", str(root / "run"), *flags]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits_backbone):
    return train_through_cli(tmp_path_factory.mktemp("cli"), digits_backbone)


def export_and_verify(run, fmt, tmp_path, capsys, source=None, optimization="basic") -> dict:
    """``fwdgrad export`` then ``fwdgrad verify-onnx`` on 300 digits: the verification report."""
    assert main(["export", str(source or run), "--format", fmt, "--out", str(tmp_path / f"{fmt}.onnx")]) == 0
    assert main(["verify-onnx", str(tmp_path / f"{fmt}.onnx"), "--run", str(run), "--data", "digits",
                 "--samples", "300", "--optimization", optimization, "--json", str(tmp_path / f"{fmt}.json")]) == 0
    out = capsys.readouterr().out
    assert "top-1 onnxruntime" in out and f"onnxruntime optimization {optimization}" in out
    report = json.loads((tmp_path / f"{fmt}.json").read_text())
    for kind in ("warning", "hint"):
        assert (kind in report) == (f"note: {report.get(kind)}" in out)
    return report


def test_export_and_verify_a_training_run(trained_run, tmp_path, capsys):
    """Round trip: quantize -> train -> export -> onnxruntime's accuracy is the engine's."""
    qop = export_and_verify(trained_run, "qop", tmp_path, capsys)
    qdq = export_and_verify(trained_run, "qdq", tmp_path, capsys, source=trained_run / "checkpoint")
    assert qop["samples"] == 300 and qop["format"] == "qop" and qop["bits"] == "w8a8" and qop["scales"] == "float"
    assert qop["max_integer_difference"] == 0 and qop["top1_agreement"] == 1.0
    assert qop["onnxruntime_top1"] == qop["engine_top1"] > 0.3  # a trained model, not chance (0.1)
    assert qdq["top1_agreement"] >= 0.99 and abs(qdq["onnxruntime_top1"] - qdq["engine_top1"]) <= 0.01
    assert ("hint" in qdq) == INT8_DOT_PRODUCTS and "hint" not in qop  # where --optimization int8 is exact
    if INT8_DOT_PRODUCTS:
        fused = export_and_verify(trained_run, "qdq", tmp_path, capsys, optimization="int8")
        assert fused["max_integer_difference"] == 0 and "warning" not in fused and "hint" not in fused
    summary = json.loads((trained_run / "summary.json").read_text())
    meta = {p.key: p.value for p in onnx.load(tmp_path / "qop.onnx").metadata_props}
    assert json.loads(meta["training_summary"])["weights_sha256"] == summary["weights_sha256"]
    assert (meta["source_model"], meta["dataset"], meta["bits"]) == ("small-cnn", "digits", "w8a8")


def test_a_power_of_two_run_exports_exactly_as_qdq(digits_backbone, tmp_path, capsys):
    """quantize with --scales pow2 -> train -> export qdq: onnxruntime computes the engine's integers."""
    run = train_through_cli(tmp_path, digits_backbone, "--scales", "pow2")
    qdq = export_and_verify(run, "qdq", tmp_path, capsys)
    assert qdq["max_integer_difference"] == 0 and qdq["top1_agreement"] == 1.0
    assert qdq["onnxruntime_top1"] == qdq["engine_top1"] > 0.3
    assert qdq["scales"] == "pow2" and "warning" not in qdq and "hint" not in qdq
    fused = export_and_verify(run, "qdq", tmp_path, capsys, optimization="int8")  # whose add rounds ties its way
    assert "--optimization basic or all" in fused["warning"]


def test_verify_onnx_says_what_16_bit_weights_in_qdq_get(digits_backbone, tmp_path, capsys):
    """No onnxruntime kernel takes 16-bit integer weights: the qdq file runs in float, and verify-onnx says
    so and names the exact format; qop of the same run is exact."""
    run = train_through_cli(tmp_path, digits_backbone, "--bits", "w16a8")
    qdq = export_and_verify(run, "qdq", tmp_path, capsys, source=run / "checkpoint")
    assert qdq["bits"] == "w16a8" and "no integer kernel for 16-bit weights" in qdq["hint"]
    assert "--format qop" in qdq["hint"] and qdq["top1_agreement"] >= 0.99
    qop = export_and_verify(run, "qop", tmp_path, capsys)
    assert qop["max_integer_difference"] == 0 and "hint" not in qop


@pytest.mark.parametrize("fmt, scales", [("qop", "float"), ("qdq", "pow2")])
def test_quantize_writes_the_engines_model(residual_net, tmp_path, capsys, fmt, scales):
    """Post-training quantization straight to a deployable file: onnxruntime computes the engine's integers."""
    _, x, _, proto = residual_net
    onnx.save(proto, tmp_path / "float.onnx")
    np.save(tmp_path / "calib.npy", x[:200])
    np.save(tmp_path / "test.npy", x[1500:])
    out = tmp_path / f"{fmt}.onnx"
    assert main(["quantize", str(tmp_path / "float.onnx"), "--calibration", str(tmp_path / "calib.npy"), "--evaluate",
                 str(tmp_path / "test.npy"), "--bits", "w8a8", "--scales", scales, "--format", fmt,
                 "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    graph = convert(proto, x[:200], bits="w8a8", scales=scales, equalize_channels="depthwise")  # quantize's default
    model = onnx.load(out)
    logits = session(model).run(["logits"], {"input": x[1500:]})[0]
    assert np.array_equal(quantize(logits, graph.output_params), graph.forward(x[1500:]))
    meta = {p.key: p.value for p in model.metadata_props}
    assert (meta["format"], meta["scales"], meta["source_model"]) == (fmt, scales, "float.onnx")
    assert main(["quantize", str(tmp_path / "float.onnx"), "--calibration", str(tmp_path / "calib.npy"),
                 "--bits", "w8a8", "w16a8", "--out", str(out)]) == 2
    assert "--out writes one model: give one --bits, not w8a8 w16a8" in capsys.readouterr().err


def test_bad_files_are_reported(trained_run, tmp_path, capsys):
    good = tmp_path / "good.onnx"
    assert main(["export", str(trained_run), "--out", str(good)]) == 0
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[:500])
    assert main(["verify-onnx", str(truncated), "--run", str(trained_run)]) == 2
    assert f"{truncated} is not a valid ONNX model" in capsys.readouterr().err
    edited = onnx.load(good)
    next(n for n in edited.graph.node if n.op_type == "QLinearConv").op_type = "QLinearConvolution"
    onnx.save(edited, tmp_path / "edited.onnx")
    assert main(["verify-onnx", str(tmp_path / "edited.onnx"), "--run", str(trained_run)]) == 2
    assert "QLinearConvolution" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "holds no training checkpoint" in capsys.readouterr().err
