"""Activation equalization: the float function is kept, free pairs keep their weight integers, and 8-bit
activations gain where channel ranges differ."""
import numpy as np
import onnx
import pytest

from conftest import export_to_proto
from quant.calibration import calibrate
from quant.convert import convert, lower
from quant.equalize import MAX_FACTOR, equalize
from quant.metrics import snr_db
from quant.tensor import dequantize


@pytest.fixture(scope="module")
def uneven_net():
    """Conv -> depthwise (a free pair), depthwise -> grouped conv, a residual stream read by dense convs,
    max pooling inside the stream, concat and a linear head; channel ranges spread over 30x with the
    layers downstream compensating (as BatchNorm folding leaves MobileNetV2), and some stem channels
    saturating their ReLU6."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.proj = nn.Conv2d(8, 8, 1)
            self.pool = nn.MaxPool2d(2)
            self.expand = nn.Conv2d(8, 12, 1)
            self.side = nn.Conv2d(8, 4, 1)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            a = torch.clamp(self.stem(x), 0, 6)
            b = torch.clamp(self.dw(a), 0, 6)
            c = self.grouped(b)
            d = self.pool(c + self.proj(c))
            e = torch.cat([torch.relu(self.expand(d)), self.side(d)], dim=1)
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(e, 1), 1))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # channel c of the stem's output and of the residual stream scaled by spread[c],
        spread = torch.logspace(-1.5, 0, 8)  # and the layers reading them scaled back: every channel matters
        for conv in (net.stem, net.grouped, net.proj):
            conv.weight.mul_(spread.view(-1, 1, 1, 1))
            conv.bias.mul_(spread)
        net.dw.weight.div_(spread.view(-1, 1, 1, 1))
        for conv in (net.expand, net.side):
            conv.weight.div_(spread.view(1, -1, 1, 1))
        net.stem.bias.add_(torch.linspace(0, 8, 8))  # the widest channels saturate at 6
    x = np.random.default_rng(0).normal(size=(300, 3, 12, 12)).astype(np.float32)
    return net.eval(), x, export_to_proto(net, torch.tensor(x[:1]))


def float_logits(net, x):
    import torch

    with torch.no_grad():
        return net(torch.tensor(x)).numpy()


def _layers_and_factors(proto, x, mode, wbits=8, abits=8):
    layers, input_name, output_name = lower(proto)
    stats = calibrate(proto, [input_name] + [l.output for l in layers if l.calibrated], x)
    return layers, stats, equalize(layers, input_name, output_name, stats, mode, wbits, abits)


def test_groups_factors_and_what_is_left_alone(uneven_net):
    net, x, proto = uneven_net
    layers, stats, factors = _layers_and_factors(proto, x[:200], "all")
    stem_out = next(l.output for l in layers if "stem" in l.name)
    stream = {l.output for l in layers if l.kind in ("add", "maxpool")} | {l.output for l in layers if "grouped" in l.name}
    assert stem_out in factors and stream <= set(factors)
    assert len({id(factors[t]) for t in stream}) == 1  # a residual stream and its pooling share one set
    for t, f in factors.items():
        assert np.all(f >= 1.0) and f.min() == 1.0  # the widest channel keeps its scale; none shrinks
    stem_stats = stats.stats[stem_out]
    assert stem_stats.channel_max.max() == pytest.approx(6.0)  # some channel saturates its ReLU6 ...
    saturated = stem_stats.channel_max >= 6.0 - 1e-6
    assert np.all(factors[stem_out][saturated] == 1.0)  # ... and keeps factor 1, so it saturates as before
    magnitude = stem_stats.channel_max  # ReLU6: >= 0
    expected = np.minimum(magnitude.max() / magnitude, MAX_FACTOR)  # depthwise consumer: alpha = 1, capped
    assert np.allclose(factors[stem_out], expected) and factors[stem_out].max() == MAX_FACTOR
    concat_inputs = {t for l in layers if l.kind == "concat" for t in l.inputs}
    assert not concat_inputs & set(factors) and lower(proto)[2] not in factors
    _, _, depthwise_only = _layers_and_factors(proto, x[:200], "depthwise")
    assert set(depthwise_only) == {stem_out}
    _, _, none = _layers_and_factors(proto, x[:200], "none")
    _, _, wide = _layers_and_factors(proto, x[:200], "all", abits=16)
    assert none == {} and wide == {}  # 16-bit activations are never equalized


def _with_layer_weights(net, layers):
    """A copy of the torch net carrying the (equalized) float layers' weights, matched by module name."""
    import copy

    import torch

    twin = copy.deepcopy(net)
    with torch.no_grad():
        for name, module in twin.named_children():
            if hasattr(module, "weight"):
                layer = next(l for l in layers if f"/{name}/" in l.name)
                module.weight.copy_(torch.tensor(layer.weight))
                module.bias.copy_(torch.tensor(layer.bias))
    return twin


@pytest.mark.parametrize("mode", ["depthwise", "all"])
@pytest.mark.parametrize("wbits", [8, 16])
def test_equalized_float_model_computes_the_same_function(uneven_net, mode, wbits):
    """On the calibration data the rescaled float layers give the original logits (the clamps bind on
    exactly the same values), so a factor applied to the wrong channel or axis cannot hide."""
    net, x, proto = uneven_net
    layers, _, factors = _layers_and_factors(proto, x[:200], mode, wbits)
    assert factors
    twin = _with_layer_weights(net, layers)
    ref = float_logits(net, x[:200])
    assert np.allclose(float_logits(twin, x[:200]), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert not np.allclose(twin.stem.weight.detach().numpy(), net.stem.weight.detach().numpy())  # the weights did change


@pytest.mark.parametrize("mode", ["none", "depthwise", "all"])
def test_equalized_graph_tracks_float_and_backends_agree(uneven_net, mode):
    net, x, proto = uneven_net
    graph = convert(proto, x[:200], bits="w16a8", equalize_channels=mode)
    assert snr_db(float_logits(net, x[200:]), graph.forward_float(x[200:])) > 25
    assert np.array_equal(graph.forward(x[200:240], backend="numpy"), graph.forward(x[200:240], backend="numba"))


def test_free_pair_keeps_weight_integers_and_gains_resolution(uneven_net):
    net, x, proto = uneven_net
    plain = convert(proto, x[:200], bits="w8a8", equalize_channels="none")
    equalized = convert(proto, x[:200], bits="w8a8", equalize_channels="depthwise")
    for name in ("stem", "dw"):
        a, b = (next(n for n in g.weighted_nodes() if name in n.name) for g in (plain, equalized))
        assert np.mean(a.weight != b.weight) < 0.01 and np.abs(a.weight.astype(int) - b.weight).max() <= 1
        assert not np.allclose(a.w_params.scale, b.w_params.scale)  # the factors went into the scales
    stem = next(n for n in plain.weighted_nodes() if "stem" in n.name).output
    widths = [np.abs(g.prefix(x[200:], until=next(n.name for n in g.nodes if "dw" in n.name))[stem].astype(int)
                     - g.nodes[0].out_params.zero_point).max(axis=(0, 2, 3)) for g in (plain, equalized)]
    # every channel is stretched towards the widest: by the cap (8) for the narrowest, to the full range for the rest
    assert np.all(widths[1] >= np.minimum(6 * widths[0], 240)) and widths[0].min() < 5 < 20 < widths[1].min()


def _float_tensor(proto, tensor, x):
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(probe.SerializeToString()).run([tensor], {"input": x})[0]


def _engine_tensor(graph, tensor, x):
    after = next(i for i, n in enumerate(graph.nodes) if n.output == tensor) + 1
    return dequantize(graph.prefix(x, until=graph.nodes[after].name)[tensor], graph.params_of(tensor))


@pytest.mark.parametrize("bits", ["w8a8", "w16a8"])
def test_equalization_improves_8bit_activations(uneven_net, bits):
    """Measured where it acts: the depthwise conv's output (its input tensor equalized for free) and the
    dense expand conv's output (its input, the residual stream, equalized at a cost in weight bits). Each is
    compared in modes that leave the tensor itself unscaled (with "all" the depthwise output is rescaled too)."""
    net, x, proto = uneven_net
    graphs = {mode: convert(proto, x[:200], bits=bits, equalize_channels=mode) for mode in ("none", "depthwise", "all")}
    snr = {}
    for layer in ("dw", "expand"):
        tensor = next(n.output for n in graphs["none"].nodes if layer in n.name)
        ref = _float_tensor(proto, tensor, x[200:])
        snr[layer] = {mode: snr_db(ref, _engine_tensor(g, tensor, x[200:])) for mode, g in graphs.items()}
    assert snr["dw"]["depthwise"] > snr["dw"]["none"] + 6, snr
    assert snr["expand"]["all"] > snr["expand"]["depthwise"] + 3, snr


def test_metadata_and_bad_mode(uneven_net):
    net, x, proto = uneven_net
    graph = convert(proto, x[:50], equalize_channels="depthwise")
    assert graph.metadata["equalize"] == "depthwise" and graph.metadata["equalized_tensors"] == 1
    with pytest.raises(ValueError, match="unknown equalize 'some'.*depthwise"):
        convert(proto, x[:50], equalize_channels="some")
