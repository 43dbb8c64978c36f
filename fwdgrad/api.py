"""fwdgrad from Python: the whole journey from a float ONNX file to a verified integer file in a few calls.

    import fwdgrad.api as fg

    report = fg.quantize("model.onnx", "data.npz", bits="w16a8", out="model-w16a8.onnx")
    run = fg.train("model.onnx", "data.npz", out="runs/zo", epochs=5)          # forward gradients only
    bp = fg.train("model.onnx", "data.npz", out="runs/bp", method="bp", epochs=5)  # the backprop reference
    print(run.summary["integer_top1"], bp.summary["integer_top1"])              # integers beside integers
    path = run.export("model-trained.onnx")                                     # qop: bit-exact in onnxruntime
    check = run.verify(path)                     # on the run's own test split; check["mismatch"] == []

``model`` is a zoo name or an ONNX path (float, or an integer file fwdgrad wrote); ``data`` a registered
set, an ``.npz`` (``x_train, y_train, x_test, y_test``, optional ``x_calibration``) or an image folder.
Settings are :class:`fwdgrad.config.TrainConfig` fields; a bad one raises ``ValueError`` naming it. The
command line is a thin layer over these functions.
"""
from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .rundir import read_json


class Run:
    """A training run directory: its settings, its summary once finished, and the way to the edge."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(read_json(self.path / "config.json", "run configuration"))

    @property
    def summary(self) -> dict:
        """summary.json: zero-shot and final top-1 (``integer_top1``: the deployable integers), forward
        calls, trainable bytes, the budget used, fingerprints of the model and data files."""
        return read_json(self.path / "summary.json", "run summary")

    def export(self, out: str | Path, fmt: str = "qop") -> Path:
        """The trained integers as ONNX: ``qop`` (integer operators, onnxruntime computes the engine's
        integers) or ``qdq`` (Q/DQ pairs around float operators, for converters)."""
        from .deploy import export_run

        return export_run(self.path, fmt, out)

    def verify(self, onnx_file: str | Path, data: str | None = None, samples: int = 1000,
               optimization: str = "basic") -> dict:
        """onnxruntime on ``onnx_file`` against this run's engine, on ``data``'s test split (default: the
        run's); ``report["mismatch"]`` lists what does not match (empty when the file is the run's model)."""
        from .verify import verify_onnx

        return verify_onnx(onnx_file, self.path, data, samples, optimization)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"


def train(model: str | Path | None = None, data: str | Path | None = None, out: str | Path | None = None, *,
          resume: bool = False, config: str | Path | None = None, **settings) -> Run:
    """Train ``model`` on ``data`` into the run directory ``out`` (``resume=True`` continues the run there
    from its last checkpoint, to the integers an uninterrupted run ends on). ``config``: a TOML file of
    settings, which keyword settings override."""
    from .locks import run_writer

    if out is None:
        raise ValueError("say where to write the run: out=DIR (--out DIR)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file: name a directory for the run")
    given = {k: str(v) for k, v in (("model", model), ("dataset", data)) if v is not None} | settings
    if resume:
        if not (out / "checkpoint" / "state.json").exists():
            raise FileNotFoundError(f"nothing to resume in {out}: no checkpoint/state.json (start it with --out)")
        given = (TrainConfig.read_toml(config) if config else {}) | given  # checked against the run's
        cfg = TrainConfig.from_dict(read_json(out / "config.json", "run configuration") | given)
    else:  # every setting is checked before the directory is touched
        cfg = TrainConfig.from_toml(config, given) if config else TrainConfig.from_dict(given)
    with run_writer(out):
        _train_locked(cfg, out, resume)
    return Run(out)


def _train_locked(cfg: TrainConfig, out: Path, resume: bool) -> None:
    """The run itself, while this process holds ``out``."""
    import shutil

    from .backprop import trainer_for
    from .rundir import load_graph
    from .task import prepare_data, prepare_graph

    state = out / "checkpoint" / "state.json"
    if not resume and state.exists():
        if read_json(state, "checkpoint").get("step", 0):
            raise ValueError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
        shutil.rmtree(out / "checkpoint")  # a run refused or stopped before its first step: start it again
    data_split = prepare_data(cfg)
    for note in data_split.notes:
        _note(note)
    graph = load_graph(out) if resume else prepare_graph(cfg, data_split, out)
    trainer_for(cfg)(graph, data_split, cfg, out).run(resume=resume)


def quantize(model: str | Path, data: str | Path, bits: str = "w8a8", out: str | Path | None = None,
             fmt: str = "qop", **options) -> dict:
    """Quantize a float ONNX model on ``data`` (calibration: ``x_calibration``, else the first training
    samples, as ``train`` takes them) and report float and integer top-1 on its test split, agreement and
    logit SNR; with ``out``, write the integer model (the one ``train(out_file, data)`` starts from).
    ``options``: rounding, scales, equalize, head, image_scaling, calibration_samples, method."""
    from .ptq import quantize_file

    report = quantize_file(model, data=data, bits=[bits], out=out, fmt=fmt, **options)
    for note in report.pop("notes"):
        _note(note)
    return report


def _note(text: str) -> None:
    import sys

    print(f"note: {text}", file=sys.stderr)


def load(path: str | Path) -> Run:
    """An existing run directory."""
    return Run(path)


__all__ = ["Run", "train", "quantize", "load"]
