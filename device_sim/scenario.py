"""Scenarios: which devices of a fleet run which firmware, written as YAML files operators can add to.

A scenario file (``device_sim/scenarios/<name>.yaml``)::

    name: mixed-hostile            # defaults to the file name
    description: one line for reports
    seed: 7                        # secrets, variants and the choice of devices derive from it
    fleet: {size: 40, site: AMS-T1, types: [xray_baggage, ...]}    # all optional
    profiles:                      # applied in order; a device gets at most one profile
      - profile: covert_field      # a name from device_sim.hostile.PROFILES
        share: 0.1                 # this fraction of the whole fleet (at least one device) ...
        types: [xray_baggage]      # ... chosen among these families (default: any) ...
      - profile: namespace
        devices: [cg-00001]        # ... or exactly these devices
        options: {victim: xr-00002, every: 2}   # keyword options of the profile

Every device not named by an entry stays honest. The choice of devices is a function of the seed and
the fleet only (a SHA-256 order), never of the run. Errors name the file and the entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from device_sim.devices import DeviceSpec, make_fleet
from device_sim.firmware import FirmwareProfile
from device_sim.hostile import PROFILES, make_profile
from gateway.catalog import DEVICE_TYPES
from gateway.errors import ConfigError

__all__ = ["Assignment", "Scenario", "load_scenario", "SCENARIO_DIR", "scenario_names"]

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

_TOP_KEYS = {"name", "description", "seed", "fleet", "profiles"}
_FLEET_KEYS = {"size", "site", "types"}
_ENTRY_KEYS = {"profile", "share", "types", "devices", "options"}


@dataclass(frozen=True, slots=True)
class Assignment:
    profile: str
    share: float = 0.0
    types: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    seed: int = 0
    description: str = ""
    size: int = 24
    site: str = "AMS-T1"
    types: tuple[str, ...] = ()
    assignments: tuple[Assignment, ...] = ()

    def fleet(self) -> list[DeviceSpec]:
        """The scenario's fleet (``make_fleet`` with its size, site and types)."""
        return make_fleet(self.size, site=self.site, seed=self.seed, types=list(self.types) or None)

    def profiles_for(self, specs: Sequence[DeviceSpec]) -> dict[str, FirmwareProfile]:
        """device id -> profile for the devices the scenario makes hostile (the rest stay honest)."""
        taken: dict[str, FirmwareProfile] = {}
        by_id = {s.device_id: s for s in specs}
        for i, a in enumerate(self.assignments):
            if a.devices:
                missing = [d for d in a.devices if d not in by_id]
                if missing:
                    raise ConfigError(f"scenario {self.name}: entry {i + 1} names devices not in the fleet: {missing}")
                chosen = [by_id[d] for d in a.devices if d not in taken]
            else:
                pool = [s for s in specs if s.device_id not in taken and (not a.types or s.device_type in a.types)]
                want = max(1, round(a.share * len(specs))) if a.share > 0 else 0
                pool.sort(key=lambda s: hashlib.sha256(f"{self.seed}/{i}/{a.profile}/{s.device_id}".encode()).digest())
                chosen = pool[:want]
            for s in chosen:
                taken[s.device_id] = make_profile(a.profile, s, seed=self.seed, **a.options)
        return taken


def scenario_names() -> list[str]:
    """The scenarios shipped in ``device_sim/scenarios/``."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(path_or_name: str | Path) -> Scenario:
    """Load a scenario file, or a shipped one by name (``load_scenario("mixed-hostile")``)."""
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        path = SCENARIO_DIR / f"{path_or_name}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read scenario ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_scenario(data, source=str(path), default_name=path.stem)


def parse_scenario(data: Any, *, source: str = "<scenario>", default_name: str = "scenario") -> Scenario:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {msg}")

    if not isinstance(data, dict):
        raise bad("a scenario is a mapping")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise bad(f"unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    fleet = data.get("fleet") or {}
    if not isinstance(fleet, dict) or set(fleet) - _FLEET_KEYS:
        raise bad(f"'fleet' takes only {sorted(_FLEET_KEYS)}")
    types = tuple(fleet.get("types") or ())
    bad_types = [t for t in types if t not in DEVICE_TYPES]
    if bad_types:
        raise bad(f"unknown device types {bad_types}")
    seed = data.get("seed", 0)
    size = fleet.get("size", 24)
    if type(seed) is not int or type(size) is not int or size < 0:
        raise bad("'seed' and 'fleet.size' must be integers (size >= 0)")
    entries = data.get("profiles") or []
    if not isinstance(entries, list):
        raise bad("'profiles' is a list")
    out: list[Assignment] = []
    for i, e in enumerate(entries, 1):
        where = f"profiles[{i}]"
        if not isinstance(e, dict) or "profile" not in e:
            raise bad(f"{where}: each entry is a mapping with a 'profile'")
        if set(e) - _ENTRY_KEYS:
            raise bad(f"{where}: unknown keys {sorted(set(e) - _ENTRY_KEYS)}; allowed: {sorted(_ENTRY_KEYS)}")
        name = e["profile"]
        if name not in PROFILES:
            raise bad(f"{where}: unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}")
        share = e.get("share", 0.0)
        if not isinstance(share, int | float) or not 0 <= share <= 1:
            raise bad(f"{where}: 'share' is a fraction in [0, 1]")
        if not share and not e.get("devices"):
            raise bad(f"{where}: give a 'share' or a list of 'devices'")
        etypes = tuple(e.get("types") or ())
        if [t for t in etypes if t not in DEVICE_TYPES]:
            raise bad(f"{where}: unknown device types {[t for t in etypes if t not in DEVICE_TYPES]}")
        options = e.get("options") or {}
        if not isinstance(options, dict):
            raise bad(f"{where}: 'options' is a mapping")
        out.append(Assignment(name, float(share), etypes, tuple(e.get("devices") or ()), dict(options)))
    return Scenario(
        name=str(data.get("name", default_name)),
        seed=seed,
        description=str(data.get("description", "")),
        size=size,
        site=str(fleet.get("site", "AMS-T1")),
        types=types,
        assignments=tuple(out),
    )
