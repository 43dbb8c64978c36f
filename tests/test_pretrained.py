"""The pretrained small CNN really learned Fashion-MNIST, and survives export + quantization."""
import numpy as np

from fwdgrad.data.datasets import load_dataset
from fwdgrad.models.pretrained import accuracy, pretrain_report, pretrained_small_cnn
from fwdgrad.task import model_inputs


def test_pretrained_small_cnn_is_accurate_and_quantizes(tmp_path):
    report = pretrain_report()  # trains (about a minute) unless cached
    net = pretrained_small_cnn()
    test = load_dataset("fashion-mnist", "test")
    measured = accuracy(net, test.images, test.labels)
    assert measured == report["test_top1"] >= 0.88

    from fwdgrad.models.onnx_export import export_onnx
    from quant.convert import convert

    x = model_inputs("small-cnn", test.images[:1000], 28)
    export_onnx(net, (1, 1, 28, 28), tmp_path / "small.onnx")
    graph = convert(tmp_path / "small.onnx", model_inputs("small-cnn", load_dataset("fashion-mnist", "train").images[:256], 28),
                    bits="w8a8")
    engine_top1 = np.mean(graph.forward_float(x).argmax(1) == test.labels[:1000])
    assert engine_top1 > measured - 0.02  # int8 keeps the accuracy (within 2 points on 1000 images)
