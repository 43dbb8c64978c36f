"""Training configuration: one validated dataclass, readable from TOML and overridable from the command line.

Every setting is type-checked and range-checked by pydantic (strict types: ``epochs = "two"``, ``epochs =
1.7`` and ``train_bias = "no"`` are refused, not coerced; no NaN or infinity anywhere), so a bad value is one
clear line naming the setting, the value and what is allowed, before any work starts. Cross-setting checks
(the device's bit widths, the model file's own bits) follow in ``__post_init__``.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from quant.convert import BIT_CONFIGS, parse_bits
from quant.equalize import EQUALIZE_MODES
from quant.fixedpoint import ROUNDING_MODES
from quant.tensor import SCALE_KINDS

from .data.files import IMAGE_SCALINGS, is_data_path
from .directions import DIRECTIONS, LR_SCALES, ZO_PARAMS
from .estimators import ESTIMATORS
from .head import HEAD_UPDATES
from .node_perturbation import OUTPUTS
from .perturb import DISTRIBUTIONS, SPACES
from .selection import METHODS
from .update import SCHEDULES

BACKENDS = ("numpy", "numba", "onnxruntime")
TRAINING_METHODS = ("zo", "bp", "bp-fq")  # forward gradients; backprop float32; backprop fake-quantized
HEADS = ("auto", "keep", "probe", "random")
AUTO = "auto"


class ConfigError(ValueError):
    """Settings that cannot run: one line per bad setting, naming it, its value and what is allowed."""


def parse_bytes(text) -> int:
    """'64KB' -> 65536, '1.5MB' -> 1572864, '300' -> 300 (KB = 1024 bytes, as device datasheets use)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?i?B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"bad size {text!r}: write e.g. 64KB, 1.5MB or 4096")
    unit = match.group(2).upper().replace("I", "").rstrip("B")
    return int(float(match.group(1)) * {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}[unit])


Count = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]


@dataclass(config=ConfigDict(strict=True, allow_inf_nan=False, extra="forbid"))
class TrainConfig:
    method: Literal[TRAINING_METHODS] = "zo"
    model: str = "small-cnn"  # a zoo name (fwdgrad models) or a path to an ONNX file
    dataset: str = "digits"  # a registered set (fwdgrad data list), an .npz or a folder of images
    resolution: NonNegative = 0  # zoo models' input size; 0 = the model's default (28 small-cnn, 96 mobilenetv2)
    bits: Literal[(AUTO,) + BIT_CONFIGS] = AUTO  # auto: w16a8, or an integer model file's own
    rounding: Literal[(AUTO,) + ROUNDING_MODES] = AUTO  # auto: half_even, or an integer model file's own
    scales: Literal[(AUTO,) + SCALE_KINDS] = AUTO  # pow2: every scale a power of two (exact qdq export)
    equalize: Literal[EQUALIZE_MODES] = "depthwise"  # activation equalization before quantizing (quant.equalize)
    image_scaling: Literal[tuple(IMAGE_SCALINGS)] = "unit"  # pixels -> inputs for image folders and a file model
    estimator: Literal[ESTIMATORS] = "spsa"
    selection: Literal[METHODS] = "trady"
    budget: str = "8KB"
    resample_every: NonNegative = 0  # steps between channel resamplings; 0 = every epoch
    m: Count = 4  # perturbations per step
    space: Literal[SPACES] = "steps"  # what eps, lr and rho count in: 8-bit weight "steps" or "real" units
    eps: Positive = 2.0  # perturbation size (see space)
    lr: Positive = 0.5  # update per unit of projected gradient (see space)
    lr_scale: Literal[LR_SCALES] = "none"  # dimension: the ZO lr / the perturbed dimension; layer: per array
    zo_params: Literal[ZO_PARAMS + (OUTPUTS,)] = "weights"  # scale-bias: ZO moves per-output-channel scales and
    # biases only; outputs: node perturbation, the selected layers' outputs move (fwdgrad.node_perturbation)
    zo_sparsity: Annotated[float, Field(ge=0, lt=1)] = 0.0  # Sparse MeZO: this share of the largest weights stays put
    directions: Literal[DIRECTIONS] = "independent"  # orthogonal: the m directions of a step orthonormalised
    bp_lr: Positive = 0.05  # backprop reference: SGD learning rate on the real-valued weights
    schedule: Literal[SCHEDULES] = "cosine"
    warmup_steps: NonNegative = 0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    train_bias: bool = True  # biases of the selected layers train too (their bytes count in the budget)
    distribution: Literal[DISTRIBUTIONS] = "gaussian"
    rho: Annotated[float, Field(ge=0)] = 2.0  # sharpness-aware neighbour distance (see space)
    epochs: Count = 5
    batch_size: Count = 64
    seed: NonNegative = 0
    backend: Literal[BACKENDS] = "numba"
    device: str = "host"  # a profile name (fwdgrad devices) or a path.toml: runs that do not fit are refused
    train_samples: NonNegative = 0  # 0 = all
    test_samples: NonNegative = 0
    calibration_samples: Count = 256
    rgn_samples: Count = 256
    checkpoint_every: NonNegative = 0  # steps between checkpoints; 0 = every epoch
    head: Literal[HEADS] = AUTO  # auto: probe for zoo models, keep for a file whose outputs are the classes
    head_update: Literal[HEAD_UPDATES] = "auto"  # exact: the head's true gradient from its forward pass; exact-last:
    # and the last 1x1 conv's through the head's weights; zo: perturbed like the rest; auto: the first that applies
    head_lr: Positive = 10.0  # exact updates: step size, normalised by their inputs' mean square (fwdgrad.head)
    probe_samples: NonNegative = 0  # training images the probe head is fitted on (0 = all)
    loss: Literal["float", "integer"] = "float"  # integer: Q.16 lookup-table cross-entropy (no FPU)

    def __post_init__(self):
        try:
            size = parse_bytes(self.budget)
        except ValueError as err:
            raise ValueError(f"budget = {self.budget!r}: {err}") from None
        if size < 1:
            raise ValueError(f"budget = {self.budget!r}: must hold at least one byte, e.g. 8KB")
        if self.zo_sparsity > 0 and self.zo_params == "scale-bias":
            raise ValueError(f"zo_sparsity = {self.zo_sparsity} masks weights, but zo_params = 'scale-bias' perturbs "
                             f"channel scales, which move every weight of a channel: drop one of the two")
        self._check_node_perturbation()
        self._check_model()
        self._check_dataset()
        self.check_device_widths()

    def _check_node_perturbation(self) -> None:
        """Node perturbation draws whole output steps, one sign each, and takes one SGD step on its gradient:
        the settings that shape weight directions do not apply to it."""
        if self.zo_params != OUTPUTS:
            return
        clashes = {"zo_sparsity": self.zo_sparsity > 0, "directions": self.directions != "independent",
                   "estimator": self.estimator != "spsa", "lr_scale": self.lr_scale != "none"}
        for name, clash in clashes.items():
            if clash:
                raise ValueError(f"{name} = {getattr(self, name)!r} shapes weight perturbations, but zo_params = "
                                 f"'outputs' perturbs layer outputs: drop {name} (or use zo_params = 'weights')")
        if self.eps < 0.5:
            raise ValueError(f"eps = {self.eps} rounds to no step: with zo_params = 'outputs' eps counts 8-bit steps "
                             f"of a layer's output, whole steps: use eps >= 1 (e.g. 2)")

    def _check_model(self) -> None:
        """Zoo names and their resolutions, or a model file whose integer settings fill in ``auto``."""
        from .models.zoo import MODELS
        from .usermodel import integer_file_settings, is_model_path

        defaults = {"bits": "w16a8", "rounding": "half_even", "scales": "float"}
        if not is_model_path(self.model):
            if self.model not in MODELS:
                raise ValueError(f"unknown model {self.model!r}: use one of {', '.join(MODELS)} (`fwdgrad models`) "
                                 f"or the path of your own .onnx file")
            allowed = MODELS[self.model].resolutions
            if self.resolution and self.resolution not in allowed:
                raise ValueError(f"resolution = {self.resolution}: {self.model} takes {list(allowed)} (0 = its "
                                 f"default)")
            file_settings = {}
        else:
            if self.resolution:
                raise ValueError(f"resolution = {self.resolution} does not apply to a model file, whose input size "
                                 f"is its own: drop it (resize the data instead)")
            # a stored run's settings are resolved already: its model file need not exist any more
            needed = any(getattr(self, k) == AUTO for k in defaults) or Path(self.model).is_file()
            file_settings = integer_file_settings(self.model) if needed else {}
        for name, default in defaults.items():
            if file_settings and getattr(self, name) not in (AUTO, file_settings[name]):
                raise ValueError(f"{name} = {getattr(self, name)!r}, but {self.model} holds integers with {name} "
                                 f"{file_settings[name]!r}: drop the setting, or quantize the float model at "
                                 f"{name} {getattr(self, name)!r}")
            if getattr(self, name) == AUTO:
                setattr(self, name, file_settings.get(name, default))
        if file_settings:
            for name in ("calibration_samples", "equalize"):
                if getattr(self, name) != _DEFAULTS[name]:
                    raise ValueError(f"{name} = {getattr(self, name)!r} has no effect: {self.model} is already "
                                     f"quantized (fwdgrad quantize --out); drop it, or train the float model")

    def _check_dataset(self) -> None:
        from .data.datasets import DATASETS

        if not is_data_path(self.dataset) and self.dataset not in DATASETS:
            raise ValueError(f"unknown data set {self.dataset!r}: choose one of {', '.join(DATASETS)} "
                             f"(`fwdgrad data list`), or give your own .npz or folder of images")

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

    def source_fingerprints(self) -> dict:
        """SHA-256 of the model and data files the run is made from (None for zoo models and registered
        sets): a run resumed or reused on other files than it started on is refused."""
        from .data.files import fingerprint
        from .usermodel import is_model_path

        return {"model": fingerprint(self.model) if is_model_path(self.model) else None,
                "data": fingerprint(self.dataset) if is_data_path(self.dataset) else None}

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
            hints = [f"{close[0]!r} for {k!r}" for k in unknown if (close := difflib.get_close_matches(k, known, 1))]
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            raise ConfigError(f"unknown config keys {unknown}{hint}; known: {sorted(known)}")
        return cls(**values)

    @staticmethod
    def read_toml(path: str | Path) -> dict:
        """The settings a TOML file gives (its [train] table, or its top-level keys), unvalidated."""
        values = read_settings_file(path)
        return values.get("train", values)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        return cls.from_dict(cls.read_toml(path) | (overrides or {}))


def read_settings_file(path: str | Path, sections: tuple[str, ...] | None = None) -> dict:
    """A TOML file of settings (compare grids, studies, fleets, `train --config`): parsed with errors that
    name the file, its sections checked against ``sections``, and relative model and data paths in any of
    its tables taken relative to the file itself, so a grid runs the same from any working directory."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no settings file at {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML ({err}): write settings as key = value, "
                          f"e.g. budget = \"8KB\"") from None
    if sections is not None:
        unknown = sorted(set(spec) - set(sections))
        if unknown:
            raise ConfigError(f"{path}: unknown sections {unknown}; use {', '.join(f'[{s}]' for s in sections)}")
    for table in [spec] + [t for v in spec.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, dict)]:
        for key in ("model", "dataset"):
            if key in table:
                table[key] = _beside(table[key], path.parent)
    return spec


def _beside(value, folder: Path):
    """A relative model/data path as seen from ``folder``; names (zoo models, registered sets) unchanged."""
    from .usermodel import is_model_path

    if isinstance(value, list):
        return [_beside(v, folder) for v in value]
    if not isinstance(value, str) or Path(value).is_absolute():
        return value
    if is_model_path(value) or is_data_path(value) or (folder / value).is_dir():
        return str(folder / value)
    return value


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
_RANGES = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than": "< {lt}"}


def describe_errors(err: ValidationError) -> str:
    """One clause per bad setting: the setting, the value given and what it must be."""
    parts = []
    for e in err.errors():
        name = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        if e["type"] == "value_error":  # a cross-setting check in __post_init__: its message says it all
            parts.append(str(e["ctx"]["error"]))
        elif e["type"] == "literal_error":
            allowed = [a.strip("'") for a in e["ctx"]["expected"].replace(" or ", ", ").split(", ")]
            parts.append(f"bad {name} {value!r}: use one of {', '.join(allowed)}")
        elif e["type"] == "unexpected_keyword_argument":
            parts.append(f"unknown setting {name!r}")
        elif e["type"] in _RANGES:
            parts.append(f"{name} = {value!r}: must be {_RANGES[e['type']].format(**e['ctx'])}")
        elif e["type"] == "finite_number":
            parts.append(f"{name} = {value!r}: must be a finite number")
        else:
            expected = {"int_type": "a whole number", "float_type": "a number", "bool_type": "true or false",
                        "string_type": "a string in quotes"}.get(e["type"], e["msg"].lower())
            quoted = " (without quotes)" if isinstance(value, str) and e["type"] != "string_type" else ""
            parts.append(f"{name} = {value!r}: must be {expected}{quoted}")
    return "; ".join(parts)


_validated_init = TrainConfig.__init__


def _init(self, *args, **kwargs):
    """pydantic's validating constructor, with its report turned into fwdgrad's one-line error."""
    try:
        _validated_init(self, *args, **kwargs)
    except ValidationError as err:
        raise ConfigError(describe_errors(err)) from None


TrainConfig.__init__ = _init
