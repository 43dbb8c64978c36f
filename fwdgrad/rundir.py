"""What a run directory holds on disk, written atomically and read back without executing anything.

    RUN/config.json            the settings (TrainConfig)
    RUN/metrics.jsonl          one row per finished epoch
    RUN/summary.json           written when the run ends
    RUN/checkpoint/graph.json  the quantized graph (quant.serialize), its integers in graph.npz
    RUN/checkpoint/weights-<step>.npz, state.json   the last checkpoint (the state file names its weights)

Every file is written to a temporary name and renamed, so a kill leaves the old file or the new one, never
half of one; the temporary is removed when the write fails (a full disk). Arrays are read with
``allow_pickle=False`` and JSON with errors that name the file, so a damaged or hostile run directory gives
a clear error, never a traceback or code execution.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from quant.graph import QGraph
from quant.serialize import GraphFormatError, describe, rebuild


class RunDirError(ValueError):
    """A run directory file that is missing, damaged or not fwdgrad's."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, default=_json_default).encode())


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_json(path: Path, what: str = "run file"):
    """A JSON file's value, or a RunDirError that names the file and what to do."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing: this {what} was not written by a complete fwdgrad run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path} is damaged ({err}): the {what} cannot be read; train into a new --out") from None


def npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_npz(path: Path, what: str = "checkpoint") -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickles), or a RunDirError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {k: stored[k] for k in stored.files}
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing: the {what} is incomplete; train into a new --out") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise RunDirError(f"{path} is damaged ({type(err).__name__}: {err}): the {what} cannot be read; "
                          f"train into a new --out") from None


def save_graph(directory: Path, graph: QGraph) -> None:
    """``graph.npz`` (the integers) first, then ``graph.json`` (which names them)."""
    description, arrays = describe(graph)
    atomic_write_bytes(directory / "graph.npz", npz_bytes(arrays))
    atomic_write_json(directory / "graph.json", description)


def load_graph(out: str | Path) -> QGraph:
    """The quantized graph of the run in ``out`` (RUN/checkpoint/graph.json and graph.npz)."""
    ckpt = Path(out) / "checkpoint"
    if not (ckpt / "graph.json").exists() and (ckpt / "graph.pkl").exists():
        raise RunDirError(f"{out} was written by an older fwdgrad (checkpoint/graph.pkl, a pickle, which is never "
                          f"opened: it could run code): train it again into a new --out")
    description = read_json(ckpt / "graph.json", "quantized graph")
    try:
        return rebuild(description, read_npz(ckpt / "graph.npz", "quantized graph"))
    except GraphFormatError as err:
        raise RunDirError(f"{ckpt / 'graph.json'}: {err}") from None


def save_checkpoint(ckpt: Path, state: dict, weights: dict, momentum: dict) -> None:
    """Weights first (under a step-specific name), then the state that points at them; older weights go."""
    name = f"weights-{state['step']:08d}.npz"
    buffer = npz_bytes({**{f"w:{k}": v for k, v in weights.items()},
                        **{f"m:{k}": np.asarray(v) for k, v in momentum.items()}})
    atomic_write_bytes(ckpt / name, buffer)
    atomic_write_json(ckpt / "state.json", state | {"weights_file": name})
    for old in ckpt.glob("weights-*.npz"):
        if old.name != name:
            old.unlink()


def load_checkpoint(out: str | Path) -> tuple[dict, dict, dict]:
    """(state, weights, momentum) of the last checkpoint of the run in ``out``."""
    ckpt = Path(out) / "checkpoint"
    state = read_json(ckpt / "state.json", "checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("weights_file"), str):
        raise RunDirError(f"{ckpt / 'state.json'} is not a fwdgrad checkpoint state: train into a new --out")
    arrays = read_npz(ckpt / Path(state["weights_file"]).name)
    weights = {k[2:]: arrays[k] for k in arrays if k.startswith("w:")}
    momentum = {k[2:]: arrays[k] for k in arrays if k.startswith("m:")}
    return state, weights, momentum


def weights_digest(weights: dict) -> str:
    """A fingerprint of the integers, to compare runs (resume, backends) bit for bit."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(weights[key]).tobytes())
    return digest.hexdigest()
