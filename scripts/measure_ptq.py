"""How far post-training quantization moves ImageNet MobileNetV2 from its float self, against a peer.

On the same real photo crops: the float model in onnxruntime is the reference; we report top-1 agreement
and logit SNR of our engine at each bit width and calibration, and of onnxruntime's own int8 quantizer
(quantize_static, QOperator, per-channel s8 weights, u8 activations, min-max) calibrated on the same
crops. Random crops of a few photos are often ambiguous (the float model's top-2 logits close), and
those are where any quantizer flips the arg-max: agreement is also given on the crops whose float
top-1 margin is at least one logit. Writes its section of docs/engine.md.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench_engine import onnxruntime_int8
from doc_sections import markdown_table, write_section
from fwdgrad.data.photos import real_photos
from fwdgrad.models.zoo import model_onnx
from fwdgrad.ptq import engine_logits, float_logits
from quant.convert import convert
from quant.metrics import snr_db, top1_agreement

DOC = Path(__file__).resolve().parent.parent / "docs" / "engine.md"
PHOTO_SETS = {"bundled": "the bundled photos",  # fwdgrad.data.photos.PHOTO_SETS, described
              "debian": "41 other photos, scenes the calibration crops do not show (two Debian packages' "
                        "images: fwdgrad.data.debian_photos)"}
CONFIDENT_MARGIN = 1.0  # logits between the float model's first and second class

OURS = [("w8a8", "minmax", "float", "none"), ("w8a8", "minmax", "float", "depthwise"),
        ("w8a8", "minmax", "float", "all"), ("w8a8", "mse", "float", "none"), ("w8a8", "mse", "float", "all"),
        ("w8a8", "minmax", "pow2", "all"), ("w8a8", "mse", "pow2", "all"),
        ("w16a8", "minmax", "float", "none"), ("w16a8", "minmax", "float", "all"),
        ("w8a16", "minmax", "float", "none"), ("w16a16", "minmax", "float", "none")]  # 16-bit activations: never equalized
EQUALIZED = {"none": "", "depthwise": ", conv -> depthwise pairs equalized", "all": ", equalized"}


def onnxruntime_logits(path: Path, calibration: np.ndarray, x: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        session = onnxruntime_int8(path, calibration, Path(tmp))
        return np.concatenate([session.run(None, {"input": x[i:i + 32]})[0] for i in range(0, len(x), 32)])


def scores(reference: np.ndarray, logits: np.ndarray) -> dict:
    """What every PTQ measurement here reports of a quantized model's logits against the float model's."""
    return {"agreement": top1_agreement(reference, logits), "snr_db": snr_db(reference, logits)}


def photo_task(resolution: int, images: int, calibration_images: int, photos: str = "bundled"):
    """MobileNetV2's ONNX file at ``resolution``, calibration crops of the bundled photos (seed 1),
    evaluation crops of the set ``photos`` (seed 0) and the float model's logits on them: what every PTQ
    measurement here compares against."""
    path = model_onnx("mobilenetv2", resolution=resolution)
    calibration = real_photos(calibration_images, resolution, seed=1)
    evaluation = real_photos(images, resolution, seed=0, photos=photos)
    return path, calibration, evaluation, float_logits(path, evaluation)


def measure(resolution: int, images: int, calibration_images: int, photos: str) -> list[dict]:
    path, calibration, evaluation, reference = photo_task(resolution, images, calibration_images, photos)
    top2 = np.sort(reference, axis=1)[:, -2:]
    confident = top2[:, 1] - top2[:, 0] >= CONFIDENT_MARGIN
    candidates = [(f"ours {bits} ({method}, bias correction{EQUALIZED[eq]}"
                   f"{', power-of-two scales' if scales == 'pow2' else ''})",
                   lambda b=bits, m=method, s=scales, e=eq: engine_logits(
                       convert(path, calibration, bits=b, calibration=m, scales=s, equalize_channels=e),
                       evaluation, label=b)[0])
                  for bits, method, scales, eq in OURS]
    candidates.append(("onnxruntime quantize_static int8 (u8/s8, min-max)",
                       lambda: onnxruntime_logits(path, calibration, evaluation)))
    rows = []
    for name, logits_of in candidates:
        logits = logits_of()
        rows.append({"resolution": resolution, "quantizer": name, "images": images,
                     "confident": int(confident.sum()), **scores(reference, logits),
                     "agreement_confident": top1_agreement(reference[confident], logits[confident])})
        print(rows[-1], flush=True)
    return rows


def render(rows: list[dict], calibration_images: int, photos: str) -> str:
    lines = [f"## Accuracy against float{'' if photos == 'bundled' else ', other scenes'} (`scripts/measure_ptq.py"
             f"{'' if photos == 'bundled' else ' --photos ' + photos}`)", "",
             f"ImageNet MobileNetV2; reference: the float model in onnxruntime. Evaluation: random crops of "
             f"{PHOTO_SETS[photos]} (seed 0), calibration: {calibration_images} crops of the bundled photos (seed 1), "
             f"the same for every quantizer. *Confident* crops: the float model's top-1 logit leads the second by at least "
             f"{CONFIDENT_MARGIN:g}.", "",
             *markdown_table(["resolution", "quantizer", "top-1 agreement (all crops)",
                              "top-1 agreement (confident crops)", "logit SNR dB"],
                             [[r["resolution"], r["quantizer"], f"{r['agreement']:.1%} of {r['images']}",
                               f"{r['agreement_confident']:.1%} of {r['confident']}", f"{r['snr_db']:.1f}"]
                              for r in rows])]
    return "\n".join(lines)


def measure_main(description: str, measure, render, section: str, resolutions: list[int]) -> None:
    """The command line the PTQ measurements share: measure at each resolution, rewrite the doc section
    (``section``, or ``section_<photos>`` for another photo set, so each set keeps its own table)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--resolutions", type=int, nargs="+", default=resolutions)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--photos", choices=sorted(PHOTO_SETS), default="bundled",
                        help="the evaluation crops' photos (calibration is always on the bundled ones)")
    args = parser.parse_args()
    rows = [row for res in args.resolutions for row in measure(res, args.images, args.calibration, args.photos)]
    name = section if args.photos == "bundled" else f"{section}_{args.photos}"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    write_section(DOC, "\n".join([begin, render(rows, args.calibration, args.photos), "", end]), begin, end)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    measure_main(__doc__, measure, render, "measure_ptq", [224, 128])
