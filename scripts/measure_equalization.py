"""How activation equalization's two settings were chosen: the dense consumers' migration strength alpha and
the cap on factors, swept on ImageNet MobileNetV2 against its float self (same crops and calibration as
scripts/measure_ptq.py). Writes its section of docs/engine.md.
"""
from __future__ import annotations

from fwdgrad.ptq import engine_logits
from doc_sections import markdown_table
from measure_ptq import PHOTO_SETS, measure_main, photo_task, scores
from quant.convert import convert
from quant.equalize import MAX_FACTOR, Equalization

ALPHAS = (0.25, 0.5, 0.75, 1.0)
CAPS = (2.0, MAX_FACTOR, 1e4)


def settings() -> list[tuple[str, str, Equalization]]:
    """(sweep, bits, setting): alpha at the default cap, the cap at the default alpha, and what equalizing
    16-bit activations would do."""
    rows = [("none", bits, Equalization("none")) for bits in ("w8a8", "w16a8", "w16a16")]
    rows += [("alpha", bits, Equalization("all", alpha=a)) for bits in ("w8a8", "w16a8") for a in ALPHAS]
    rows += [("cap", bits, Equalization("all", max_factor=c)) for bits in ("w8a8", "w16a8") for c in CAPS]
    rows += [("16-bit activations", "w16a16", Equalization("depthwise", max_factor=c, wide_activations=True))
             for c in CAPS]
    return rows


def measure(resolution: int, images: int, calibration_images: int, photos: str) -> list[dict]:
    path, calibration, evaluation, reference = photo_task(resolution, images, calibration_images, photos)
    rows = []
    for sweep, bits, setting in settings():
        graph = convert(path, calibration, bits=bits, equalize_channels=setting)
        logits = engine_logits(graph, evaluation, label=f"{bits} {sweep}")[0]
        rows.append({"resolution": resolution, "sweep": sweep, "bits": bits, "mode": setting.mode,
                     "alpha": setting.alpha, "max_factor": setting.max_factor,
                     "equalized": graph.metadata["equalized_tensors"], "images": images,
                     **scores(reference, logits)})
        print(rows[-1], flush=True)
    return rows


def render(rows: list[dict], calibration_images: int, photos: str) -> str:
    lines = ["### Choosing alpha and the cap (`scripts/measure_equalization.py`)", "",
             f"ImageNet MobileNetV2, {rows[0]['images']} crops of {PHOTO_SETS[photos]} (seed 0) against the float "
             f"model, calibration on {calibration_images} crops of the bundled photos, minmax, bias correction. "
             f"alpha: the dense consumers' strength (default: 1/2 for 8-bit weights, 1 for 16-bit); cap: the largest factor "
             f"(default {MAX_FACTOR:g}; 10000 is in effect none).", "",
             *markdown_table(["resolution", "sweep", "bits", "mode", "alpha", "cap", "tensors equalized",
                              "top-1 agreement", "logit SNR dB"],
                             [[r["resolution"], r["sweep"], r["bits"], r["mode"],
                               "default" if r["alpha"] is None else f"{r['alpha']:g}", f"{r['max_factor']:g}",
                               r["equalized"], f"{r['agreement']:.1%}", f"{r['snr_db']:.1f}"] for r in rows])]
    return "\n".join(lines)


if __name__ == "__main__":
    measure_main(__doc__, measure, render, "measure_equalization", [128])
