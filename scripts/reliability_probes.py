"""Writes docs/reliability.md: bad inputs tried as a careful user would, each run here, with what happened.

Every probe is a real command line (a subprocess, as a user runs it) on a tiny user model and data made in a
scratch directory, sometimes after damaging a file the way a crash, a full disk or a stranger would. Each
outcome is classified from the exit code and what was printed:

- clear error: exit 2 (or 1 for a verify-onnx mismatch), one `fwdgrad: error:` / `fwdgrad: mismatch:` line,
  no traceback;
- traceback: any Python traceback;
- silent: exit 0 where the input was bad (a wrong or silently changed result).

    python scripts/reliability_probes.py [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN = "train --model user.onnx --data data.npz --epochs 1 --batch-size 50 --m 1"


def run(work: Path, command: str, env: dict | None = None, timeout: int = 600):
    argv = [sys.executable, "-m", "fwdgrad.cli", *command.split()[1:]]
    result = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, FWDGRAD_CACHE=str(work / "cache"), **(env or {})))
    return result.returncode, result.stdout, result.stderr


def classify(code: int, stdout: str, stderr: str) -> tuple[str, str]:
    text = stdout + stderr
    if "Traceback" in text:
        return "traceback", text.strip().splitlines()[-1]
    lines = [line for line in stderr.splitlines() if line.startswith(("fwdgrad: error:", "fwdgrad: mismatch:"))]
    if code in (1, 2) and lines:
        return "clear error", lines[0]
    return ("silent" if code == 0 else "unclear"), (text.strip().splitlines() or [""])[-1]


def damage(work: Path) -> None:
    """The bad files some probes use."""
    import onnx
    from onnx import helper, numpy_helper

    data = dict(np.load(work / "data.npz"))
    np.savez(work / "nan.npz", **(data | {"x_train": np.where(np.arange(300)[:, None, None, None] == 7, np.nan,
                                                             data["x_train"])}))
    np.savez(work / "labels.npz", **(data | {"y_test": data["y_test"] + 10}))
    np.savez(work / "shape.npz", **(data | {"x_train": data["x_train"][:, :, :8, :8]}))
    np.savez(work / "missing.npz", **{k: v for k, v in data.items() if k != "y_test"})
    np.savez(work / "objects.npz", x_train=np.array([{"a": 1}], dtype=object))
    np.save(work / "calib.npz.npy", data["x_train"])
    (work / "truncated.npz").write_bytes((work / "data.npz").read_bytes()[:1000])
    proto = onnx.load(work / "user.onnx")
    two = onnx.ModelProto()
    two.CopyFrom(proto)
    two.graph.input.append(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1, 4]))
    onnx.save(two, work / "two-inputs.onnx")
    nan_model = onnx.ModelProto()
    nan_model.CopyFrom(proto)
    tensor = next(t for t in nan_model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    values = numpy_helper.to_array(tensor).copy()
    values.flat[0] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(nan_model, work / "nan-weight.onnx")
    (work / "not-onnx.onnx").write_text("hello")
    device = (ROOT / "devices" / "cortex-m4.toml").read_text()
    for name, value in (("nan", "nan"), ("true", "true"), ("negative", "-4")):
        (work / f"sram-{name}.toml").write_text("\n".join(f"sram_kb = {value}" if line.startswith("sram_kb")
                                                          else line for line in device.splitlines()))
    for name, text in (("lr-nan", "lr = nan"), ("epochs-two", 'epochs = "two"'), ("lr-string", 'lr = "0.5"'),
                       ("bias-no", 'train_bias = "no"'), ("epochs-float", "epochs = 1.7"),
                       ("unknown-key", "learning_rate = 0.1"), ("broken", "budget = 8KB")):
        (work / f"{name}.toml").write_text(f"[train]\n{text}\n")


def tampered_files(work: Path) -> None:
    """An exported file with a Sin after the logits, and one with zeroed weights."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(work / "trained.onnx")
    sin = onnx.ModelProto()
    sin.CopyFrom(model)
    for node in sin.graph.node:
        node.output[:] = ["logits_pre" if o == "logits" else o for o in node.output]
    sin.graph.node.append(helper.make_node("Sin", ["logits_pre"], ["logits"], name="sneaky"))
    onnx.save(sin, work / "sin.onnx")
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for tensor in zeroed.graph.initializer:
        if "weight" in tensor.name:
            tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(tensor)), tensor.name))
    onnx.save(zeroed, work / "zeroed.onnx")


def probes(work: Path) -> list[dict]:
    """(what, command, setup) rows; setup runs before the command (files damaged, a writer started)."""
    rows = []

    def probe(what: str, command: str, before=None, env=None, expect_ok: bool = False):
        if before is not None:
            before()
        code, out, err = run(work, command, env)
        kind, message = classify(code, out, err)
        if expect_ok:
            kind = "ok" if code == 0 else kind
        rows.append({"what": what, "command": command, "exit": code, "kind": kind, "message": message})
        print(f"{kind:12s} {code}  {what}", flush=True)

    # 1. non-finite and out-of-range settings
    for flag in ("--lr nan", "--lr inf", "--eps nan", "--eps inf", "--rho nan", "--momentum nan", "--momentum 5",
                 "--train-samples -5", "--warmup-steps -5", "--seed -1", "--resample-every -1", "--rgn-samples 0",
                 "--calibration-samples 0", "--m 0", "--budget 0", "--budget lots", "--head-lr 0"):
        probe(f"setting {flag}", f"fwdgrad {TRAIN} {flag} --out runs/p".replace(" --m 1 --m", " --m"))
    probe("zoo model with --resolution 13", "fwdgrad train --model small-cnn --resolution 13 --out runs/r13")
    probe("file model with --resolution 32", f"fwdgrad {TRAIN} --resolution 32 --out runs/r32")
    for name in ("nan", "true", "negative"):
        probe(f"device file sram_kb = {name}", f"fwdgrad {TRAIN} --device sram-{name}.toml --out runs/dev")
    # 2. TOML values of the wrong type
    for name in ("lr-nan", "epochs-two", "lr-string", "bias-no", "epochs-float", "unknown-key", "broken"):
        probe(f"TOML {name}", f"fwdgrad train --model user.onnx --data data.npz --config {name}.toml --out runs/t")
    # 3. two writers of one run directory
    long_run = f"{TRAIN} --epochs 400 --out runs/busy".split()
    writer = subprocess.Popen([sys.executable, "-m", "fwdgrad.cli", *long_run], cwd=work,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, FWDGRAD_CACHE=str(work / "cache")))
    deadline = time.time() + 300
    while not (work / "runs/busy/checkpoint/state.json").exists() and time.time() < deadline:
        if writer.poll() is not None:
            raise RuntimeError(f"the first writer of runs/busy exited with {writer.returncode} before training")
        time.sleep(0.1)
    probe("a second train --out D while D trains", f"fwdgrad {TRAIN} --epochs 400 --out runs/busy")
    probe("--resume D while D trains", "fwdgrad train --resume runs/busy")
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    # 4./6./7. damaged run directories and exports
    probe("a finished run to export", f"fwdgrad {TRAIN} --out runs/good", expect_ok=True)
    probe("export it", "fwdgrad export runs/good --out trained.onnx", expect_ok=True)
    tampered_files(work)
    probe("verify-onnx: a Sin node appended after the logits", "fwdgrad verify-onnx sin.onnx --data data.npz")
    probe("verify-onnx: zeroed weights", "fwdgrad verify-onnx zeroed.onnx --data data.npz")
    probe("verify-onnx: a file not written by fwdgrad", "fwdgrad verify-onnx user.onnx --data data.npz")
    probe("verify-onnx: not an ONNX file", "fwdgrad verify-onnx not-onnx.onnx --data data.npz")
    probe("verify-onnx: no test data named", "fwdgrad verify-onnx trained.onnx")
    probe("verify-onnx: data of another shape", "fwdgrad verify-onnx trained.onnx --data digits")
    import shutil

    def copy_run(name: str, damage_file=None):
        def before():
            shutil.rmtree(work / "runs" / name, ignore_errors=True)
            shutil.copytree(work / "runs/good", work / "runs" / name)
            if damage_file is not None:
                damage_file(work / "runs" / name / "checkpoint")
        return before

    def truncate_weights(ckpt):
        weights = next(ckpt.glob("weights-*.npz"))
        weights.write_bytes(weights.read_bytes()[:200])

    def pickle_graph(ckpt):
        (ckpt / "graph.json").unlink()
        (ckpt / "graph.pkl").write_bytes(b"cos\nsystem\n(S'echo owned'\ntR.")

    probe("export: truncated weights file", "fwdgrad export runs/w --out w.onnx", copy_run("w", truncate_weights))
    probe("resume: truncated weights file", "fwdgrad train --resume runs/w2", copy_run("w2", truncate_weights))
    probe("export: a pickle instead of graph.json", "fwdgrad export runs/p2 --out p.onnx", copy_run("p2", pickle_graph))
    probe("resume: truncated graph.json", "fwdgrad train --resume runs/g",
          copy_run("g", lambda c: (c / "graph.json").write_text('{"format": "fwdgrad-graph/1", "no')))
    probe("resume: empty state.json", "fwdgrad train --resume runs/s", copy_run("s", lambda c: (c / "state.json").write_text("")))
    probe("resume: truncated config.json", "fwdgrad train --resume runs/c",
          copy_run("c", lambda c: (c.parent / "config.json").write_text('{"lr": ')))
    (work / "a-file").write_text("x")
    probe("--out naming an existing file", f"fwdgrad {TRAIN} --out a-file")
    probe("export --out naming a directory", "fwdgrad export runs/good --out runs")
    full = _tiny_filesystem(work)
    if full is not None:
        probe("train on a full disk", f"fwdgrad {TRAIN} --out {full}/run")
        probe("export to a full disk", f"fwdgrad export runs/good --out {full}/big.onnx")
    # 8. a run refused late, then corrected in the same directory
    probe("a budget below one channel", f"fwdgrad {TRAIN} --budget 2B --out runs/late")
    probe("... then the corrected budget in the same --out", f"fwdgrad {TRAIN} --budget 8KB --out runs/late",
          expect_ok=True)
    # 10. data and model mistakes
    for name, what in (("nan.npz", "NaN in x_train"), ("labels.npz", "labels beyond the outputs"),
                       ("shape.npz", "inputs of another shape"), ("missing.npz", "y_test missing"),
                       ("objects.npz", "a pickled object array"), ("truncated.npz", "a truncated .npz"),
                       ("nowhere.npz", "no such file")):
        probe(f"data: {what}", f"fwdgrad train --model user.onnx --data {name} --out runs/d")
    for name, what in (("two-inputs.onnx", "a two-input model"), ("nan-weight.onnx", "a NaN weight"),
                       ("not-onnx.onnx", "not an ONNX file"), ("nowhere.onnx", "no such file")):
        probe(f"model: {what}", f"fwdgrad quantize {name} --data data.npz")
    probe("quantize: an .npz given as --calibration (taken as --data)", "fwdgrad quantize user.onnx --calibration "
          "data.npz --bits w8a8", expect_ok=True)
    probe("quantize: no calibration data", "fwdgrad quantize user.onnx")
    probe("plan: bad --bits", "fwdgrad plan --model user.onnx --bits w4a8")
    probe("plan: --m 0", "fwdgrad plan --model user.onnx --m 0")
    return rows


def _tiny_filesystem(work: Path) -> str | None:
    """A 64 KB tmpfs, filled to the last byte (a tiny run would fit in 64 KB; needs mount rights; None where
    there are none)."""
    target = work / "full"
    target.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)], capture_output=True)
    if done.returncode != 0:
        return None
    try:
        with open(target / "filler", "wb") as filler:
            while True:
                filler.write(b"x" * 1024)
                filler.flush()
    except OSError:
        pass
    return str(target)


def page(rows: list[dict]) -> str:
    counts = {kind: sum(r["kind"] == kind for r in rows) for kind in ("clear error", "traceback", "silent", "unclear")}
    bad = [r for r in rows if r["kind"] != "ok"]
    lines = ["# Reliability", "",
             "What a careful user's mistakes, crashes and tampering get. Every row below was run on this machine by "
             "`python scripts/reliability_probes.py` (which rewrites this page): a real command line on a tiny user "
             "model and data, sometimes after damaging a file. The tests that keep it so: tests/test_reliability.py "
             "(generated bad values for every setting, two writers, a kill between a metrics row and its "
             "checkpoint), tests/test_errors.py, tests/test_byo.py.", "",
             f"Of {len(bad)} bad inputs: **{counts['clear error']} clear errors, {counts['traceback']} tracebacks, "
             f"{counts['silent']} silent results, {counts['unclear']} unclear** (exit 2, or 1 for a verify-onnx "
             f"mismatch, with one `fwdgrad: error:` / `fwdgrad: mismatch:` line). Rows marked ok are the good "
             f"commands a probe needs, and the corrected command after a refusal.", "",
             "| probe | command | exit | outcome | message |", "|---|---|---|---|---|"]
    for r in rows:
        message = r["message"].replace("|", "\\|")
        lines.append(f"| {r['what']} | `{r['command']}` | {r['exit']} | {r['kind']} | {message} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="scratch directory (default: a fresh temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fwdgrad-probes-"))
    work.mkdir(parents=True, exist_ok=True)
    from tests.conftest import user_files

    user_files(work)
    damage(work)
    rows = probes(work)
    (ROOT / "docs" / "reliability.md").write_text(page(rows))
    (work / "probes.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote docs/reliability.md ({len(rows)} probes)")


if __name__ == "__main__":
    main()
