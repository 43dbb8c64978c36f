"""Device profiles: one TOML file each (shipped here, or the user's own ``--device path.toml``).

Profiles are data, not code, so that adding a board is writing a file; every field is checked on load
(pydantic, strict types, finite numbers) so a typo fails with the field's name instead of producing a plan
for an imaginary chip.
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

PROFILE_DIR = Path(__file__).resolve().parent
Size = Annotated[int, Field(ge=0)]  # KB; 0 = unlimited
Rate = Annotated[float, Field(gt=0)]
Energy = Annotated[float, Field(ge=0)]
Widths = Annotated[tuple[Literal[8, 16], ...], Field(min_length=1)]


# strict: sram_kb = true or "256" is refused, not read as 1 or 256; no NaN or infinity anywhere
@dataclass(frozen=True, config=ConfigDict(strict=True, allow_inf_nan=False, extra="forbid"))
class Profile:
    name: str
    description: str
    sram_kb: Size
    flash_kb: Size
    weight_bits: Widths
    activation_bits: Widths
    accumulator_bits: Literal[32, 64]
    macs_per_cycle: Annotated[int, Field(ge=1)]
    clock_mhz: Rate
    fpu: bool
    energy_per_mac_pj: Energy
    energy_per_byte_pj: Energy
    sources: Annotated[tuple[str, ...], Field(min_length=1)]

    @property
    def sram_bytes(self) -> int | None:
        return self.sram_kb * 1024 or None

    @property
    def flash_bytes(self) -> int | None:
        return self.flash_kb * 1024 or None

    def supports(self, weight_bits: int, activation_bits: int) -> bool:
        return weight_bits in self.weight_bits and activation_bits in self.activation_bits

    def as_dict(self) -> dict:
        return asdict(self)


def _check(values: dict, origin: str) -> Profile:
    """The profile, or one ValueError naming every bad field, its value and what it must be."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # TOML arrays are lists
    try:
        return Profile(**values)
    except ValidationError as err:
        problems, seen = [], set()
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"][:1]) or "?"
            if field in seen:  # one clause per field
                continue
            seen.add(field)
            if e["type"] in ("missing", "missing_argument"):
                problems.append(f"{field} is missing")
            elif e["type"] == "unexpected_keyword_argument":
                problems.append(f"unknown field {field!r}")
            else:
                problems.append(f"{field} = {values.get(field)!r}: {e['msg'].lower()}")
        raise ValueError(f"device profile {origin}: {'; '.join(problems)}") from None


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name (``cortex-m4``), or a user's TOML file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise ValueError(f"unknown device {name_or_path!r}: choose one of {', '.join(profile_names())} "
                             f"(`fwdgrad devices`), or pass your own profile as --device path.toml")
    if not path.exists():
        raise FileNotFoundError(f"device profile {path} does not exist")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"device profile {path} is not valid TOML: {err}") from None
    return _check(values, str(path))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def all_profiles() -> list[Profile]:
    return [load_profile(name) for name in profile_names()]
