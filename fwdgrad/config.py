"""Training configuration: one dataclass, readable from TOML and overridable from the command line."""
from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from quant.convert import parse_bits
from quant.fixedpoint import check_rounding
from quant.equalize import check_equalize
from quant.tensor import check_scales

from .estimators import ESTIMATORS
from .perturb import DISTRIBUTIONS, SPACES
from .selection import METHODS
from .update import SCHEDULES

BACKENDS = ("numpy", "numba", "onnxruntime")


def parse_bytes(text) -> int:
    """'64KB' -> 65536, '1.5MB' -> 1572864, '300' -> 300 (KB = 1024 bytes, as device datasheets use)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?i?B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"bad size {text!r}: write e.g. 64KB, 1.5MB or 4096")
    unit = match.group(2).upper().replace("I", "").rstrip("B")
    return int(float(match.group(1)) * {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}[unit])


TRAINING_METHODS = ("zo", "bp", "bp-fq")  # forward gradients; backprop float32; backprop fake-quantized


@dataclass
class TrainConfig:
    method: str = "zo"
    model: str = "small-cnn"
    dataset: str = "digits"
    resolution: int = 0  # model input size; 0 = the model's default (28 small-cnn, 96 mobilenetv2)
    bits: str = "w16a8"
    rounding: str = "half_even"
    scales: str = "float"  # "pow2": every scale a power of two (shift-only requantization, exact qdq export)
    equalize: str = "depthwise"  # activation equalization before quantizing (quant.equalize): depthwise, all, none
    estimator: str = "spsa"
    selection: str = "trady"
    budget: str = "8KB"
    resample_every: int = 0  # steps between channel resamplings; 0 = every epoch
    m: int = 4  # perturbations per step
    space: str = "steps"  # what eps, lr and rho count in: "steps" (8-bit weight steps) or "real" (weight units)
    eps: float = 2.0  # perturbation size (see space)
    lr: float = 0.5  # update per unit of projected gradient (see space)
    lr_scale: str = "none"  # "dimension": the ZO lr is divided by the number of perturbed weights
    bp_lr: float = 0.05  # backprop reference: SGD learning rate on the real-valued weights
    schedule: str = "cosine"
    warmup_steps: int = 0
    momentum: float = 0.0
    train_bias: bool = True  # biases of the selected layers train too (their bytes count in the budget)
    distribution: str = "gaussian"
    rho: float = 2.0  # sharpness-aware neighbour distance (see space)
    epochs: int = 5
    batch_size: int = 64
    seed: int = 0
    backend: str = "numba"
    device: str = "host"  # a profile name (fwdgrad devices) or a path.toml: runs that do not fit are refused
    train_samples: int = 0  # 0 = all
    test_samples: int = 0
    calibration_samples: int = 256
    rgn_samples: int = 256
    checkpoint_every: int = 0  # steps between checkpoints; 0 = every epoch
    head: str = "probe"  # how the task's classifier starts: probe (logistic-regression probe), random, keep
    probe_samples: int = 0  # training images the probe head is fitted on (0 = all)
    loss: str = "float"  # float: cross-entropy on dequantized logits; integer: Q.16 lookup-table CE (no FPU)

    def __post_init__(self):
        parse_bits(self.bits)
        check_rounding(self.rounding)
        check_scales(self.scales)
        check_equalize(self.equalize)
        parse_bytes(self.budget)
        for name, value, allowed in (("method", self.method, TRAINING_METHODS),
                                     ("estimator", self.estimator, ESTIMATORS), ("selection", self.selection, METHODS),
                                     ("schedule", self.schedule, SCHEDULES), ("backend", self.backend, BACKENDS),
                                     ("distribution", self.distribution, DISTRIBUTIONS), ("space", self.space, SPACES),
                                     ("head", self.head, ("probe", "random", "keep")),
                                     ("lr_scale", self.lr_scale, ("none", "dimension")),
                                     ("loss", self.loss, ("float", "integer"))):
            if value not in allowed:
                raise ValueError(f"bad {name} {value!r}: use one of {', '.join(allowed)}")
        self.check_device_widths()
        for name in ("m", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eps <= 0 or self.lr <= 0 or self.bp_lr <= 0:
            raise ValueError(f"eps, lr and bp_lr must be > 0, got eps={self.eps}, lr={self.lr}, bp_lr={self.bp_lr}")

    def check_device_widths(self) -> None:
        """Refuse, before any work, bit widths the target device cannot run."""
        from devices.profiles import load_profile

        profile = load_profile(self.device)
        wbits, abits = parse_bits(self.bits)
        if not profile.supports(wbits, abits):
            raise ValueError(f"device {profile.name} runs weights of {list(profile.weight_bits)} bits and "
                             f"activations of {list(profile.activation_bits)} bits, not {self.bits}: use "
                             f"w{profile.weight_bits[0]}a{profile.activation_bits[0]} or another --device")
        if not profile.fpu and self.loss == "float" and self.method == "zo":
            raise ValueError(f"device {profile.name} has no FPU for the float cross-entropy: use --loss integer")

    @property
    def budget_bytes(self) -> int:
        return parse_bytes(self.budget)

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        """Identity of a run: everything except where it is written and how (backend)."""
        identity = {k: v for k, v in self.to_dict().items() if k not in ("backend",)}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def changes_from(self, stored: dict) -> str:
        """' (lr: the run has 0.5, now 3.0; ...)': how a run directory's settings differ from these, for errors.

        ``stored`` is the run's config.json; settings it predates count at their defaults, as in its digest."""
        theirs = TrainConfig.from_dict(stored).to_dict()
        changed = [f"{k}: the run has {theirs[k]!r}, now {v!r}" for k, v in self.to_dict().items()
                   if k != "backend" and theirs[k] != v]
        return f" ({'; '.join(changed)})" if changed else ""

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            import difflib

            hints = [f"{close[0]!r} for {k!r}" for k in unknown if (close := difflib.get_close_matches(k, known, 1))]
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            raise ValueError(f"unknown config keys {unknown}{hint}; known: {sorted(known)}")
        return cls(**values)

    @staticmethod
    def read_toml(path: str | Path) -> dict:
        """The settings a TOML file gives (its [train] table, or its top-level keys), unvalidated."""
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML ({err}): write settings as key = value, "
                             f"e.g. budget = \"8KB\"") from err
        return values.get("train", values)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        return cls.from_dict(cls.read_toml(path) | (overrides or {}))
