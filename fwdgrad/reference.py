"""The float twin of a QGraph in PyTorch: gradients for layer ranking (RGN) and the backprop reference.

The twin computes exactly the graph's float semantics (dequantized weights and biases, fused clamps as
real-valued clamps, no activation rounding), so its gradients are "the true gradient" that forward-gradient
estimates are compared against. torch is imported lazily: only this module and export helpers use it.
"""
from __future__ import annotations

import numpy as np

from quant.graph import QGraph
from quant.ops import QAdd, QAvgPool, QClamp, QConcat, QConv, QLinear, QMaxPool, QReshape
from quant.tensor import QParams, dequantize


def _real_clamp(params: QParams, clamp: tuple[int, int]) -> tuple[float, float]:
    scale = float(params.scale)
    return (clamp[0] - params.zero_point) * scale, (clamp[1] - params.zero_point) * scale


def float_weights(graph: QGraph, weights: dict | None = None) -> dict[str, np.ndarray]:
    """Dequantized weight and bias of every weighted node (``weights`` overrides the stored integers)."""
    weights = weights or {}
    out = {}
    for node in graph.weighted_nodes():
        w = weights.get(node.weight_key, node.weight)
        b = weights.get(node.bias_key, node.bias)
        out[node.weight_key] = dequantize(w, node.w_params)
        out[node.bias_key] = (b.astype(np.float64) * float(node.in_params.scale) * node.w_params.scale.astype(np.float64)
                              ).astype(np.float32)
    return out


def _fake_quant(t, params: QParams, axis: int | None = None):
    """Round ``t`` onto the integer grid of ``params`` in the forward pass, identity in the backward pass
    (the straight-through estimator of quantization-aware training)."""
    import torch

    scale = torch.as_tensor(np.asarray(params.scale, np.float32))
    if axis is not None and scale.ndim:
        scale = scale.reshape([-1 if i == axis else 1 for i in range(t.ndim)])
    q = torch.clamp(torch.round(t / scale) + params.zero_point, params.qmin, params.qmax)
    return t + ((q - params.zero_point) * scale - t).detach()


class FloatTwin:
    """Callable float model of ``graph``: ``twin(x, params)`` with ``params`` a dict of torch tensors.

    With ``fake_quant`` the twin rounds the input, every weight and every node output onto the graph's
    integer grids (straight-through gradients): the backprop reference for quantization-aware training,
    whose forward pass matches the integer engine up to requantization rounding."""

    def __init__(self, graph: QGraph, fake_quant: bool = False):
        self.graph = graph
        self.fake_quant = fake_quant

    def parameters(self, weights: dict | None = None, requires_grad: bool = True) -> dict:
        import torch

        return {k: torch.tensor(v, requires_grad=requires_grad) for k, v in float_weights(self.graph, weights).items()}

    def __call__(self, x, params: dict):
        import torch
        import torch.nn.functional as F

        env = {self.graph.input_name: torch.as_tensor(np.asarray(x, np.float32))}
        if self.fake_quant:
            env[self.graph.input_name] = _fake_quant(env[self.graph.input_name], self.graph.input_params)
            params = params | {n.weight_key: _fake_quant(params[n.weight_key], n.w_params, 0)
                               for n in self.graph.weighted_nodes()}
        for node in self.graph.nodes:
            xs = [env[t] for t in node.inputs]
            if isinstance(node, QConv):
                g = node.geometry
                pt, pl, pb, pr = g.pads
                y = F.conv2d(F.pad(xs[0], (pl, pr, pt, pb)), params[node.weight_key], params[node.bias_key],
                             stride=g.stride, dilation=g.dilation, groups=g.groups)
                y = torch.clamp(y, *_real_clamp(node.out_params, node.clamp))
            elif isinstance(node, QLinear):
                y = F.linear(xs[0], params[node.weight_key], params[node.bias_key])
                y = torch.clamp(y, *_real_clamp(node.out_params, node.clamp))
            elif isinstance(node, QAdd):
                y = torch.clamp(xs[0] + xs[1], *_real_clamp(node.out_params, node.clamp))
            elif isinstance(node, QClamp):
                y = torch.clamp(xs[0], *_real_clamp(node.out_params, node.clamp))
            elif isinstance(node, QMaxPool):
                y = _pool(F.max_pool2d, xs[0], node.geometry, -float("inf"))
            elif isinstance(node, QAvgPool):
                y = (xs[0].mean(dim=(2, 3), keepdim=True) if node.geometry is None
                     else _avg_pool(xs[0], node.geometry))
            elif isinstance(node, QReshape):
                y = xs[0].reshape([xs[0].shape[i] if d == 0 else d for i, d in enumerate(node.shape)])
            elif isinstance(node, QConcat):
                y = torch.cat(xs, dim=node.axis)
            else:
                raise NotImplementedError(f"no float twin for {type(node).__name__}")
            env[node.output] = _fake_quant(y, node.out_params) if self.fake_quant else y
        return env[self.graph.output_name]


def _pool(fn, x, geometry, fill):
    import torch.nn.functional as F

    pt, pl, pb, pr = geometry.pads
    return fn(F.pad(x, (pl, pr, pt, pb), value=fill), geometry.kernel, geometry.stride)


def _avg_pool(x, geometry):
    """Average over the taps inside the input (count_include_pad=False) or over the whole kernel."""
    import torch
    import torch.nn.functional as F

    total = _pool(lambda t, k, s: F.avg_pool2d(t, k, s) * (k[0] * k[1]), x, geometry, 0.0)
    if geometry.count_include_pad:
        return total / (geometry.kernel[0] * geometry.kernel[1])
    count = _pool(lambda t, k, s: F.avg_pool2d(t, k, s) * (k[0] * k[1]), torch.ones_like(x[:1, :1]), geometry, 0.0)
    return total / count


def gradients(graph: QGraph, x: np.ndarray, y: np.ndarray, weights: dict | None = None) -> dict[str, np.ndarray]:
    """d(mean cross-entropy)/d(real weights and biases) of the float twin on one batch."""
    import torch
    import torch.nn.functional as F

    twin = FloatTwin(graph)
    params = twin.parameters(weights)
    loss = F.cross_entropy(twin(x, params), torch.as_tensor(np.asarray(y, np.int64)))
    loss.backward()
    return {k: p.grad.numpy() for k, p in params.items()}
