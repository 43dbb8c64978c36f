"""docs/devices.md: planned memory of inference, ZO training and backprop for MobileNetV2, per device.

For each (width, resolution) the quantized graph is planned with the worst selection a 64 KB budget
allows (the same accounting `fwdgrad train --device` refuses runs with), once with the prefix cached
and once recomputed. Writes the table, the headline ratios and a bar plot (docs/devices.png).
"""
from __future__ import annotations

from pathlib import Path

from devices.planner import budget_shape, plan
from devices.profiles import all_profiles
from fwdgrad.data.photos import real_photos
from fwdgrad.models.zoo import model_onnx
from quant.convert import convert

from doc_sections import write_section

ROOT = Path(__file__).resolve().parent.parent
CASES = [(1.0, 96), (1.0, 160), (0.5, 96), (0.35, 128)]
BUDGET = 64 * 1024


def rows_for(width: float, resolution: int) -> list:
    graph = convert(model_onnx("mobilenetv2", width=width, resolution=resolution), real_photos(16, resolution, seed=1),
                    bits="w8a8")
    sample = (3, resolution, resolution)
    shape = budget_shape(graph, sample, BUDGET, method="zo", m=4, batch=1, momentum=False, bits=8)
    out = []
    for profile in all_profiles():
        cached = plan(graph, sample, profile, shape)
        shape.cache_prefix = False
        recomputed = plan(graph, sample, profile, shape)
        shape.cache_prefix = True
        out.append((width, resolution, profile, cached, recomputed))
    return out


def kb(n: int) -> str:
    return f"{n / 1024:,.0f}"


def main() -> None:
    rows = [r for case in CASES for r in rows_for(*case)]
    lines = ["# Devices: will training fit?", "",
             "Planned by `devices/planner.py` (`fwdgrad plan`), written by `scripts/plan_devices.py`. MobileNetV2 "
             "w8a8 (ImageNet weights; narrower widths are channel-truncated copies, for memory studies), batch 1, "
             "m = 4, a 64 KB trainable budget placed where it costs most (the worst selection the budget allows). "
             "\"ZO\" caches the first trainable layer's input; \"ZO-r\" recomputes the prefix in every call. Backprop "
             "keeps every activation from the first trainable layer on, 32-bit gradients and the trainable copy.", "",
             "| width | res | device | flash: weights | SRAM | inference KB | ZO KB | ZO-r KB | backprop KB | "
             "ZO/inf | ZO-r/inf | BP/inf | fits inf/ZO-r/BP | ZO-r step ms | BP step ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for width, res, profile, cached, recomputed in rows:
        fits = "/".join("yes" if f else "no" for f in (cached.fits_inference, recomputed.fits_zo, cached.fits_bp))
        sram = f"{profile.sram_kb} KB" if profile.sram_kb else "unlimited"
        lines.append(f"| {width} | {res} | {profile.name} | {kb(cached.flash_weights)} KB | {sram} | "
                     f"{kb(cached.inference_peak)} | {kb(cached.zo_peak)} | {kb(recomputed.zo_peak)} | "
                     f"{kb(cached.bp_peak)} | {cached.zo_peak / cached.inference_peak:.2f} | "
                     f"{recomputed.zo_peak / cached.inference_peak:.2f} | {cached.bp_peak / cached.inference_peak:.2f} | "
                     f"{fits} | {recomputed.zo_step_seconds * 1e3:,.1f} | {cached.bp_step_seconds * 1e3:,.1f} |")
    host = [(w, r, c, rc) for w, r, p, c, rc in rows if p.name == "host"]
    zo = [rc.zo_peak / c.inference_peak for _, _, c, rc in host]
    bp = [c.bp_peak / c.inference_peak for _, _, c, _ in host]
    lines += ["", f"Headline: ZO training needs {min(zo):.2f}-{max(zo):.2f}x the inference peak (the limit is 1.0; "
              f"the excess is the trainable copy and seeds), backprop on the same selection {min(bp):.1f}-{max(bp):.1f}x.",
              "", "![memory per device](devices.png)", "",
              "Profiles (`fwdgrad devices`) are estimates from datasheets, cited in each `devices/*.toml`. The planner's "
              "arena follows TFLite Micro's greedy-by-size placement; the next section checks it against what our "
              "engine holds."]
    doc = ROOT / "docs" / "devices.md"
    begin, end = "<!-- plan_devices:begin -->", "<!-- plan_devices:end -->"
    section = "\n".join([begin] + lines + [end])
    write_section(doc, section, begin, end)
    plot(host)
    print("\n".join(lines))


def plot(host) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(8, 4.5))
    labels = [f"w{w} {r}px" for w, r, _, _ in host]
    positions = np.arange(len(host))
    for i, (name, values) in enumerate([("inference", [c.inference_peak for _, _, c, _ in host]),
                                        ("ZO training (recompute)", [rc.zo_peak for _, _, _, rc in host]),
                                        ("ZO training (cached prefix)", [c.zo_peak for _, _, c, _ in host]),
                                        ("backprop", [c.bp_peak for _, _, c, _ in host])]):
        axis.bar(positions + (i - 1.5) * 0.2, np.array(values) / 1024, 0.2, label=name)
    for profile in all_profiles():
        if profile.sram_kb and profile.sram_kb <= 2048:
            axis.axhline(profile.sram_kb, linestyle="--", linewidth=0.8, color="grey")
            axis.text(len(host) - 0.5, profile.sram_kb, f"{profile.name} SRAM", fontsize=7, va="bottom", ha="right")
    axis.set_xticks(positions, labels)
    axis.set_ylabel("peak SRAM (KB)")
    axis.set_title("MobileNetV2 w8a8, 64 KB trainable budget, batch 1")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(ROOT / "docs" / "devices.png", dpi=120)


if __name__ == "__main__":
    main()
