"""The `fwdgrad` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_demo(args) -> int:
    """Quantize the packaged ImageNet MobileNetV2 and report how close int8/int16 stay to float."""
    from fwdgrad.data.photos import real_photos
    from fwdgrad.models.zoo import model_onnx
    from fwdgrad.ptq import format_table, ptq_report

    print(f"exporting MobileNetV2 (ImageNet weights) at {args.resolution}x{args.resolution} to ONNX ...")
    path = model_onnx("mobilenetv2", resolution=args.resolution)
    calibration = real_photos(args.calibration, args.resolution, seed=1)
    evaluation = real_photos(args.images, args.resolution, seed=0)
    print(f"calibrating on {len(calibration)} and evaluating on {len(evaluation)} crops of real photos")
    results = ptq_report(path, calibration, evaluation, args.bits, backend=args.backend)
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return 0


def _cmd_quantize(args) -> int:
    """Quantize a float ONNX model with calibration data (.npy) and report against float."""
    import numpy as np

    from fwdgrad.ptq import format_table, ptq_report

    data = np.load(args.calibration)
    evaluation = np.load(args.evaluate) if args.evaluate else data
    options = {"calibration": args.method} if args.method else {}
    results = ptq_report(args.model, data, evaluation, args.bits, backend=args.backend, rounding=args.rounding,
                         **options)
    print(format_table(results))
    return 0


def _cmd_models(args) -> int:
    from fwdgrad.models.zoo import MODELS

    for name, spec in MODELS.items():
        print(f"{name:14s} resolutions {list(spec.resolutions)}  {spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from quant.convert import CALIBRATION_METHODS

    parser = argparse.ArgumentParser(prog="fwdgrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help=_cmd_demo.__doc__)
    demo.add_argument("--resolution", type=int, default=224)
    demo.add_argument("--images", type=int, default=96, help="evaluation crops")
    demo.add_argument("--calibration", type=int, default=128, help="calibration crops")
    demo.add_argument("--bits", nargs="+", default=["w8a8", "w16a8"])
    demo.add_argument("--backend", default="numba", choices=["numba", "numpy"])
    demo.add_argument("--out", help="also write the results as JSON here")
    demo.set_defaults(run=_cmd_demo)

    quantize = sub.add_parser("quantize", help=_cmd_quantize.__doc__)
    quantize.add_argument("model", help="float ONNX model (one input, logits output)")
    quantize.add_argument("--calibration", required=True, help=".npy array of calibration inputs (N, ...)")
    quantize.add_argument("--evaluate", help=".npy array of evaluation inputs (default: the calibration data)")
    quantize.add_argument("--bits", nargs="+", default=["w8a8"])
    quantize.add_argument("--rounding", default="half_even", choices=["half_even", "half_away"])
    quantize.add_argument("--method", choices=CALIBRATION_METHODS, help="calibration (default: quant.convert's)")
    quantize.add_argument("--backend", default="numba", choices=["numba", "numpy"])
    quantize.set_defaults(run=_cmd_quantize)

    models = sub.add_parser("models", help="list the model zoo")
    models.set_defaults(run=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:  # user mistakes: one clear line, no traceback
        print(f"fwdgrad: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
