"""Device profiles: one TOML file each (shipped here, or the user's own ``--device path.toml``).

Profiles are data, not code, so that adding a board is writing a file; every field is checked on load
so a typo fails with the field's name instead of producing a plan for an imaginary chip.
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    sram_kb: int  # 0 = unlimited
    flash_kb: int  # 0 = unlimited
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    accumulator_bits: int
    macs_per_cycle: int
    clock_mhz: float
    fpu: bool
    energy_per_mac_pj: float
    energy_per_byte_pj: float
    sources: tuple[str, ...]

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
    expected = {f.name: f.type for f in fields(Profile)}
    missing, unknown = sorted(set(expected) - set(values)), sorted(set(values) - set(expected))
    if missing or unknown:
        raise ValueError(f"device profile {origin}: missing fields {missing}, unknown fields {unknown}; "
                         f"a profile needs exactly {sorted(expected)}")
    for key in ("weight_bits", "activation_bits", "sources"):
        if not isinstance(values[key], list) or not values[key]:
            raise ValueError(f"device profile {origin}: {key} must be a non-empty list")
        values[key] = tuple(values[key])
    bad_bits = [b for b in values["weight_bits"] + values["activation_bits"] if b not in (8, 16)]
    if bad_bits:
        raise ValueError(f"device profile {origin}: bit widths must be 8 or 16, got {bad_bits}")
    for key in ("sram_kb", "flash_kb", "macs_per_cycle", "clock_mhz", "energy_per_mac_pj", "energy_per_byte_pj"):
        if not isinstance(values[key], (int, float)) or values[key] < 0 or (key in ("macs_per_cycle", "clock_mhz")
                                                                            and values[key] == 0):
            raise ValueError(f"device profile {origin}: {key} must be a positive number, got {values[key]!r}")
    if not isinstance(values["fpu"], bool):
        raise ValueError(f"device profile {origin}: fpu must be true or false")
    return Profile(**values)


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
