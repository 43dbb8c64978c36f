"""Float ONNX -> QGraph: accuracy at every bit width, the trainer's hooks, and clear errors."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quant.convert import ModelFormatError, UnsupportedOpError, convert, parse_bits

BITS = ["w8a8", "w16a8", "w8a16", "w16a16"]
MIN_SNR_DB = {"w8a8": 25, "w16a8": 25, "w8a16": 35, "w16a16": 40}  # logit SNR: 8-bit logits cap near 30 dB


def float_logits(net, x):
    import torch

    with torch.no_grad():
        return net(torch.tensor(x)).numpy()


def snr_db(ref, approx):
    return 10 * np.log10((ref ** 2).sum() / ((ref - approx) ** 2).sum())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rounding", ["half_even", "half_away"])
def test_quantized_net_tracks_float(residual_net, bits, rounding):
    net, x, y, proto = residual_net
    graph = convert(proto, x[:200], bits=bits, rounding=rounding)
    ops = {n.op_type for n in graph.nodes}
    assert {"Conv", "Add", "Concat", "MaxPool", "AveragePool", "Reshape", "Linear"} <= ops
    test = x[1500:]
    ref, ours = float_logits(net, test), graph.forward_float(test)
    assert snr_db(ref, ours) > MIN_SNR_DB[bits]
    assert (ref.argmax(1) == ours.argmax(1)).mean() >= 0.95
    float_top1, ours_top1 = (ref.argmax(1) == y[1500:]).mean(), (ours.argmax(1) == y[1500:]).mean()
    assert float_top1 >= 0.8  # the trained net really classifies digits
    assert ours_top1 >= float_top1 - 0.03
    assert np.array_equal(graph.forward(test[:40], backend="numpy"), graph.forward(test[:40], backend="numba"))


def test_percentile_calibration(residual_net):
    net, x, _, proto = residual_net
    graph = convert(proto, x[:200], calibration="percentile", percentile=99.9)
    minmax = convert(proto, x[:200])
    assert graph.input_params.scale <= minmax.input_params.scale
    assert (float_logits(net, x[1500:]).argmax(1) == graph.forward_float(x[1500:]).argmax(1)).mean() >= 0.95


def test_prefix_cache_and_weight_overrides(residual_net):
    _, x, _, proto = residual_net
    graph = convert(proto, x[:100], bits="w16a8")
    batch = x[:16]
    full = graph.forward(batch)
    layer = graph.weighted_nodes()[2]
    cache = graph.prefix(batch, until=layer.name)
    assert np.array_equal(graph.forward(cache, start=layer.name), full)
    bumped = -layer.weight  # a weight set that must change the output
    changed = graph.forward(cache, start=layer.name, weights={layer.weight_key: bumped})
    assert not np.array_equal(changed, full)
    assert np.array_equal(changed, graph.forward(batch, weights={layer.weight_key: bumped}, backend="numpy"))
    assert np.array_equal(graph.forward(batch), full)  # the stored weights are untouched


def test_macs_count_real_work(residual_net):
    _, x, _, proto = residual_net
    graph = convert(proto, x[:50])
    macs = graph.macs((1, 1, 8, 8))
    stem = graph.weighted_nodes()[0]
    assert macs[stem.name] == 12 * 8 * 8 * 9


def test_bits_string_is_checked():
    assert parse_bits("w16a8") == (16, 8)
    with pytest.raises(ValueError, match="w8a8, w16a8"):
        parse_bits("int8")


def _model_with(node, extra_inits=()):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, [1, 4])],
                              initializer=list(extra_inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_unsupported_op_names_type_and_node():
    model = _model_with(helper.make_node("Sigmoid", ["input"], ["out"], name="gate_7"))
    with pytest.raises(UnsupportedOpError, match=r"Sigmoid at node 'gate_7'"):
        convert(model, np.zeros((2, 4), np.float32))


def test_softmax_output_gets_a_hint():
    model = _model_with(helper.make_node("Softmax", ["input"], ["out"], name="probs"))
    with pytest.raises(UnsupportedOpError, match="export the model's logits"):
        convert(model, np.zeros((2, 4), np.float32))


def test_malformed_and_missing_files(tmp_path, residual_net):
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(residual_net[3].SerializeToString()[:500])
    with pytest.raises(ModelFormatError, match="not a valid ONNX model"):
        convert(bad, np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        convert(tmp_path / "absent.onnx", np.zeros((1, 1, 8, 8), np.float32))


def test_nan_calibration_data_is_refused(residual_net):
    data = residual_net[1][:4].copy()
    data[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        convert(residual_net[3], data)
