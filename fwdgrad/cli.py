"""The `fwdgrad` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_demo(args) -> int:
    """The main job: quantize a pretrained model w16a8, fine-tune it with forward calls only within a 256 KB
    MCU's memory (pure ZO and the hybrid), run backprop on the same channels and schedule, export to ONNX
    and verify it in onnxruntime."""
    from fwdgrad.demo import format_demo, run_demo

    summary = run_demo(args.out, epochs=args.epochs, samples=args.samples, workers=args.workers)
    print(format_demo(summary))
    print(f"report, plots and runs in {args.out}/ (report.md, accuracy_vs_epoch.png, memory.png, demo.json)")
    return 0


def _cmd_ptq_demo(args) -> int:
    """Quantize the packaged ImageNet MobileNetV2 and report how close int8/int16 stay to float."""
    from fwdgrad.data.photos import real_photos
    from fwdgrad.models.zoo import model_onnx
    from fwdgrad.ptq import format_table, ptq_report

    print(f"exporting MobileNetV2 (ImageNet weights) at {args.resolution}x{args.resolution} to ONNX ...")
    path = model_onnx("mobilenetv2", resolution=args.resolution)
    calibration = real_photos(args.calibration, args.resolution, seed=1)
    evaluation = real_photos(args.images, args.resolution, seed=0, photos=args.photos)
    print(f"calibrating on {len(calibration)} crops of the bundled photos and evaluating on {len(evaluation)} "
          f"crops of the {args.photos} photos")
    results, _ = ptq_report(path, calibration, evaluation, args.bits, backend=args.backend, scales=args.scales,
                            equalize_channels=args.equalize)
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return 0


def _cmd_quantize(args) -> int:
    """Quantize a float ONNX model with calibration data and report each bit width against float (top-1 on
    the labels with --data, agreement, logit SNR); optionally write it as a qop/qdq ONNX file."""
    from fwdgrad.ptq import quantize_file

    data = args.data or (args.calibration if str(args.calibration).endswith(".npz") else None)
    report = quantize_file(args.model, data=data, calibration=None if data else args.calibration,
                           evaluate=args.evaluate, bits=args.bits, out=args.out, fmt=args.format,
                           rounding=args.rounding, scales=args.scales, equalize=args.equalize, head=args.head,
                           image_scaling=args.image_scaling, calibration_samples=args.calibration_samples,
                           method=args.method, backend=args.backend)
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(report["table"])
    if report["written"]:
        print(f"wrote {report['written']}")
    return 0


def _cmd_train(args) -> int:
    """Fine-tune a quantized model with forward gradients (TraDy channels by default)."""
    from fwdgrad.api import train
    from fwdgrad.cli_flags import train_overrides

    if not args.out and not args.resume:
        raise ValueError("say where to write the run: --out DIR (or --resume DIR to continue one)")
    run = train(out=args.resume or args.out, resume=bool(args.resume), config=args.config, **train_overrides(args))
    print(json.dumps({k: v for k, v in run.summary.items() if k != "config"}, indent=2))
    return 0


def _cmd_compare(args) -> int:
    """Run a grid of training runs (methods x selections x budgets x seeds) and write a report."""
    from fwdgrad.compare import compare

    report, results = compare(args.config, args.out, args.workers, args.executor, args.address)
    print(report.read_text())
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"fwdgrad: run {r['dir']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_data_list(args) -> int:
    """List the registered data sets: source, installed or not (with the install command), sizes."""
    from fwdgrad.data.datasets import dataset_status

    rows = dataset_status()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        sizes = (f"{row['classes']} classes, {row['train']} train / {row['test']} test, shape {row['shape']}"
                 if "train" in row else "not built yet (built on first use)")
        state = "installed" if row["installed"] else f"NOT INSTALLED: {row['install']}"
        print(f"{row['name']:14s} {row['description']}\n{'':14s} {row['source']}; {state}; {sizes}")
    return 0


def _cmd_devices(args) -> int:
    """List the device profiles (SRAM, flash, widths, MACs/cycle, clock, FPU, energy estimates)."""
    from devices.profiles import all_profiles, load_profile

    profiles = [load_profile(args.device)] if args.device else all_profiles()
    if args.json:
        print(json.dumps([p.as_dict() for p in profiles], indent=2))
        return 0
    print(f"{'device':10s} {'SRAM':>9s} {'flash':>9s} {'weights':>8s} {'acts':>6s} {'MAC/cyc':>7s} {'MHz':>6s} FPU")
    for p in profiles:
        sram = f"{p.sram_kb} KB" if p.sram_kb else "unlimited"
        flash = f"{p.flash_kb} KB" if p.flash_kb else "unlimited"
        widths = lambda bits: "/".join(map(str, bits))  # noqa: E731
        print(f"{p.name:10s} {sram:>9s} {flash:>9s} {widths(p.weight_bits):>8s} {widths(p.activation_bits):>6s} "
              f"{p.macs_per_cycle:>7d} {p.clock_mhz:>6g} {'yes' if p.fpu else 'no'}   {p.description}")
    return 0


def _cmd_plan(args) -> int:
    """Memory and cost of inference, ZO training and backprop for a model, on every device."""
    from devices.planner import budget_shape, plan
    from devices.profiles import all_profiles, load_profile
    from fwdgrad.config import parse_bytes
    from quant.convert import parse_bits

    graph, sample, what = _plan_graph(args)
    wbits, _ = parse_bits(graph.bits)
    shape = budget_shape(graph, sample, parse_bytes(args.budget), method="zo", m=args.m, batch=args.batch,
                         momentum=False, bits=wbits)
    shape.cache_prefix = not args.no_prefix_cache
    profiles = [load_profile(args.device)] if args.device else all_profiles()
    rows = [plan(graph, sample, p, shape) for p in profiles]
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    capped = "" if shape.trainable_bytes == parse_bytes(args.budget) else " (all the model holds)"
    print(f"{what}, {graph.bits}, input {sample}, budget {args.budget}: {shape.trainable_bytes} trainable bytes"
          f"{capped}, m={args.m}, batch {args.batch}; weights {rows[0].flash_weights / 1024:.0f} KB in flash")
    print(f"{'device':10s} {'inference':>10s} {'ZO train':>10s} {'backprop':>10s}  {'ZO/inf':>6s} {'BP/inf':>6s}  "
          f"{'ZO step':>9s} {'BP step':>9s}  fits (inf/ZO/BP)")
    for r in rows:
        kb = lambda b: f"{b / 1024:.0f} KB"  # noqa: E731
        fits = "/".join("yes" if f else "no" for f in (r.fits_inference, r.fits_zo, r.fits_bp))
        print(f"{r.device:10s} {kb(r.inference_peak):>10s} {kb(r.zo_peak):>10s} {kb(r.bp_peak):>10s}  "
              f"{r.zo_peak / r.inference_peak:6.2f} {r.bp_peak / r.inference_peak:6.2f}  "
              f"{r.zo_step_seconds * 1e3:7.1f}ms {r.bp_step_seconds * 1e3:7.1f}ms  {fits}")
    return 0


def _plan_graph(args):
    """(the quantized graph to plan, one input's shape, what it is): a zoo model at a width and resolution,
    or the user's file (a float model quantized on --data, or on synthetic inputs when none is given, or an
    integer file as it is)."""
    import numpy as np

    from fwdgrad.usermodel import is_model_path, open_model
    from quant.convert import convert

    from quant.convert import parse_bits

    bits = args.bits or "w8a8"
    parse_bits(bits)  # before any work (a zoo model may first need pretraining)
    if is_model_path(args.model):
        model = open_model(args.model)
        if model.integer:
            if args.bits and args.bits != model.bits:
                raise ValueError(f"--bits {args.bits}: {args.model} holds {model.bits} integers (drop --bits)")
            return model.graph, model.sample_shape, f"{Path(args.model).name} (integer file)"
        if None in model.sample_shape:
            raise ValueError(f"{args.model} declares a free input size {model.sample_shape}: export it with a fixed "
                             f"input size to plan its memory")
        if args.data:
            from fwdgrad.data.files import load_data_file

            calibration = load_data_file(args.data, model.sample_shape).calibration[:256]
            source = f"calibrated on {len(calibration)} samples of {args.data}"
        else:
            calibration = np.random.default_rng(0).standard_normal((8,) + model.sample_shape).astype(np.float32)
            source = "calibrated on 8 synthetic N(0, 1) inputs (no --data: memory and cost do not depend on them)"
        print(f"note: {source}", file=sys.stderr)
        return convert(model.proto, calibration, bits=bits), model.sample_shape, Path(args.model).name
    from fwdgrad.models.zoo import model_input_shape, model_onnx

    resolution = args.resolution or (96 if args.model == "mobilenetv2" else None)
    sample = model_input_shape(args.model, resolution)[1:]
    path = model_onnx(args.model, width=args.width, resolution=sample[1])
    if args.model == "mobilenetv2":
        from fwdgrad.data.photos import real_photos

        calibration = real_photos(8, sample[1], seed=1)
    else:
        calibration = np.random.default_rng(0).uniform(-1, 1, (8,) + sample).astype(np.float32)
        print("note: calibrated on 8 synthetic inputs uniform in [-1, 1], the model's input range (memory and "
              "cost do not depend on them)", file=sys.stderr)
    return convert(path, calibration, bits=bits), sample, f"{args.model} width {args.width:g} at {sample[1]}px"


def _cmd_export(args) -> int:
    """Export a training run's trained integer model to ONNX (qop: integer operators; qdq: Q/DQ + float ops)."""
    from fwdgrad.deploy import export_run

    print(f"wrote {export_run(args.run_dir, args.format, args.out)}")
    return 0


def _cmd_verify_onnx(args) -> int:
    """Check an ONNX file fwdgrad wrote: its graph and integers, and onnxruntime against the engine on test
    data (exit 1 on a mismatch)."""
    from fwdgrad.verify import verify_onnx

    report = verify_onnx(args.model, args.run_dir, args.data, args.samples, args.optimization)
    against = f"the run {report['run']}" if report["run"] else "the engine rebuilt from the file"
    print(f"{report['model']} ({report['format']}, {report['bits']}, {report['scales']} scales) against {against}, "
          f"on {report['samples']} {report['data']} test samples, onnxruntime optimization {report['optimization']}:\n"
          f"  top-1 onnxruntime {report['onnxruntime_top1']:.4f}   engine {report['engine_top1']:.4f}   "
          f"agreement {report['top1_agreement']:.4f}\n"
          f"  max integer difference of the logits {report['max_integer_difference']} "
          f"({report['differing_logits']:.2%} of logits differ; outputs {', '.join(report['outputs'])})\n"
          f"  integrity: {report['integrity']}")
    for kind in ("warning", "hint"):
        if kind in report:
            print(f"  note: {report[kind]}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    for problem in report["mismatch"]:
        print(f"fwdgrad: mismatch: {args.model}: {problem}", file=sys.stderr)
    return 1 if report["mismatch"] else 0


def _cmd_models(args) -> int:
    from fwdgrad.models.zoo import MODELS

    if args.json:
        print(json.dumps({name: {"resolutions": list(spec.resolutions), "description": spec.description}
                          for name, spec in MODELS.items()}, indent=2))
        return 0
    for name, spec in MODELS.items():
        print(f"{name:14s} resolutions {list(spec.resolutions)}  {spec.description}")
    return 0


EQUALIZE_HELP = ("per-channel activation equalization before quantizing: all (default), depthwise (conv -> "
                 "depthwise pairs only: weight integers unchanged), none")


class Parser(argparse.ArgumentParser):
    """argparse, with its refusals in fwdgrad's one-line form (exit code 2 as before)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"fwdgrad: error: {self.prog.removeprefix('fwdgrad ')}: {message}\n")


def positive(text: str) -> float:
    """A finite number > 0 (a width multiplier)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from fwdgrad.cli_flags import add_config_flags, count
    from fwdgrad.deploy import OPTIMIZATION_LEVELS
    from quant.calibration import CALIBRATION_METHODS
    from quant.equalize import EQUALIZE_MODES
    from quant.tensor import SCALE_KINDS

    parser = Parser(prog="fwdgrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help=_cmd_demo.__doc__)
    demo.add_argument("--out", default="demo-out", help="directory for runs, report, plots and the ONNX file")
    demo.add_argument("--epochs", type=count, default=8, help="epochs of every run (one schedule for all)")
    demo.add_argument("--samples", type=count, default=2000, help="MNIST images to fine-tune on (as many to test on)")
    demo.add_argument("--workers", type=count, default=2, help="processes (the ZO and BP runs side by side)")
    demo.set_defaults(run=_cmd_demo)

    demo = sub.add_parser("ptq-demo", help=_cmd_ptq_demo.__doc__)
    demo.add_argument("--resolution", type=count, default=224)
    demo.add_argument("--images", type=count, default=96, help="evaluation crops")
    demo.add_argument("--calibration", type=count, default=128, help="calibration crops")
    # fwdgrad.data.photos.PHOTO_SETS, not imported here: that module loads scikit-image and scikit-learn
    demo.add_argument("--photos", default="bundled", choices=["bundled", "debian"],
                      help="evaluation photos: bundled (7 scenes in the installed wheels) or debian (41 other "
                           "scenes, fetched with apt-get download on first use)")
    demo.add_argument("--bits", nargs="+", default=["w8a8", "w16a8"])
    demo.add_argument("--scales", default="float", choices=SCALE_KINDS, help="pow2: every scale a power of two")
    demo.add_argument("--equalize", default="all", choices=EQUALIZE_MODES, help=EQUALIZE_HELP)
    demo.add_argument("--backend", default="numba", choices=["numba", "numpy"])
    demo.add_argument("--out", help="also write the results as JSON here")
    demo.set_defaults(run=_cmd_ptq_demo)

    quantize = sub.add_parser("quantize", help=_cmd_quantize.__doc__)
    quantize.add_argument("model", help="float ONNX model (one input, logits output)")
    quantize.add_argument("--data", help="your data: .npz (x_train, y_train, x_test, y_test[, x_calibration]) or a "
                                         "folder of class folders of images; calibrates on x_calibration (else "
                                         "x_train), reports top-1 on the test split")
    quantize.add_argument("--calibration", help=".npy array of calibration inputs (N, ...), instead of --data")
    quantize.add_argument("--evaluate", help=".npy array of evaluation inputs (default: the calibration data)")
    quantize.add_argument("--calibration-samples", type=count, default=256,
                          help="calibration samples (the same default as fwdgrad train)")
    quantize.add_argument("--head", default="auto", choices=["auto", "keep", "probe", "random"],
                          help="with --data: keep the head (auto, when the outputs cover the labels) or fit a new one")
    quantize.add_argument("--image-scaling", default="unit", choices=["unit", "symmetric", "imagenet"],
                          help="pixels -> inputs for an image folder: [0, 1], [-1, 1] or ImageNet-normalised")
    quantize.add_argument("--bits", nargs="+", default=["w8a8"])
    quantize.add_argument("--rounding", default="half_even", choices=["half_even", "half_away"])
    quantize.add_argument("--scales", default="float", choices=SCALE_KINDS,
                          help="pow2: every scale a power of two (shift-only requantization; qdq exports exactly)")
    quantize.add_argument("--method", choices=CALIBRATION_METHODS, help="calibration (default: quant.convert's)")
    quantize.add_argument("--equalize", default="depthwise", choices=EQUALIZE_MODES,
                          help=EQUALIZE_HELP + " (default depthwise, as fwdgrad train: the file --out writes is "
                                               "the model training starts from)")
    quantize.add_argument("--backend", default="numba", choices=["numba", "numpy"])
    quantize.add_argument("--out", help="also write the quantized model here as ONNX (one --bits)")
    quantize.add_argument("--format", default="qop", choices=["qop", "qdq"], help="ONNX form for --out")
    quantize.set_defaults(run=_cmd_quantize)

    train = sub.add_parser("train", help=_cmd_train.__doc__)
    train.add_argument("--config", help="TOML file with the settings (a [train] table or top-level keys)")
    train.add_argument("--out", help="run directory: config.json, metrics.jsonl, summary.json, checkpoint/")
    train.add_argument("--resume", help="continue the run in this directory from its last checkpoint")
    add_config_flags(train)
    train.set_defaults(run=_cmd_train)

    compare = sub.add_parser("compare", help=_cmd_compare.__doc__)
    compare.add_argument("--config", required=True, help="grid TOML: [base], [grid] lists, optional [[row]] tables")
    compare.add_argument("--out", required=True, help="report directory (runs/, report.md, results.json, plots)")
    compare.add_argument("--workers", type=count, default=2, help="parallel training processes")
    compare.add_argument("--executor", default="local", choices=["local", "ray"],
                         help="local: worker processes here; ray: one Ray task per run")
    compare.add_argument("--address", help="Ray cluster to submit to (default: a local Ray instance)")
    compare.set_defaults(run=_cmd_compare)

    data = sub.add_parser("data", help="the data-set registry")
    data_sub = data.add_subparsers(dest="action", required=True)
    data_list = data_sub.add_parser("list", help=_cmd_data_list.__doc__)
    data_list.add_argument("--json", action="store_true", help="machine-readable output")
    data_list.set_defaults(run=_cmd_data_list)

    devices = sub.add_parser("devices", help=_cmd_devices.__doc__)
    devices.add_argument("--json", action="store_true")
    devices.add_argument("--device", help="show only this profile (a name, or your own path.toml)")
    devices.set_defaults(run=_cmd_devices)

    plan = sub.add_parser("plan", help=_cmd_plan.__doc__)
    plan.add_argument("--model", default="mobilenetv2", help="a zoo model or your .onnx file (float or fwdgrad's)")
    plan.add_argument("--data", help="calibration data for a float model file (.npz or image folder; default: "
                                     "synthetic inputs)")
    plan.add_argument("--width", type=positive, default=1.0, help="zoo models: width multiplier")
    plan.add_argument("--resolution", type=count, help="zoo models: input size (default 96 for mobilenetv2, else "
                                                     "the model's own)")
    plan.add_argument("--bits", help="default w8a8 (an integer file: its own)")
    plan.add_argument("--budget", default="64KB", help="trainable bytes (the worst selection within it is planned)")
    plan.add_argument("--m", type=count, default=4)
    plan.add_argument("--batch", type=count, default=1, help="samples whose prefix activations are cached")
    plan.add_argument("--no-prefix-cache", action="store_true", help="recompute the prefix in every call instead")
    plan.add_argument("--device", help="one profile only (name or path.toml)")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(run=_cmd_plan)

    export = sub.add_parser("export", help=_cmd_export.__doc__)
    export.add_argument("run_dir", metavar="RUN", help="a training run directory (fwdgrad train --out) or its checkpoint/ directory")
    export.add_argument("--format", default="qop", choices=["qop", "qdq"])
    export.add_argument("--out", required=True, help="the .onnx file to write")
    export.set_defaults(run=_cmd_export)

    verify = sub.add_parser("verify-onnx", help=_cmd_verify_onnx.__doc__)
    verify.add_argument("model", help="an .onnx file fwdgrad wrote (export, quantize --out)")
    verify.add_argument("--run", dest="run_dir", help="compare against this training run's last checkpoint "
                                                      "(default: the engine rebuilt from the file itself)")
    verify.add_argument("--data", help="test data: your .npz or image folder, or a registered set (default: the "
                                       "run's)")
    verify.add_argument("--samples", type=count, default=1000, help="test images to compare on")
    verify.add_argument("--optimization", default="basic", choices=OPTIMIZATION_LEVELS,
                        help="onnxruntime session: basic (the file's ONNX semantics), all (its default, with "
                             "CPU-specific fusions) or int8 (all, with qdq groups fused into its int8 kernels)")
    verify.add_argument("--json", help="also write the report here")
    verify.set_defaults(run=_cmd_verify_onnx)

    models = sub.add_parser("models", help="the model zoo")
    models.add_argument("action", nargs="?", choices=["list"], default="list", help="list (the default)")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(run=_cmd_models)

    from fwdgrad.cli_scale import add_scale_commands

    add_scale_commands(sub)  # fwdgrad tune, fwdgrad fleet
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            FloatingPointError) as err:  # user mistakes: one line, no traceback
        print(f"fwdgrad: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only or unreadable path: what failed, where, and what to do
        where = f" {err.filename}" if err.filename else ""
        print(f"fwdgrad: error: cannot write or read{where}: {err.strerror or err}; free space or choose a "
              f"writable --out (nothing half-written was left)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
