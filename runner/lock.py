"""The pinned environment: `requirements.lock` beside the package, and whether this one matches it.

`make setup` and CI install every library at the version in the lock (pip constraints), so every
machine runs the same code; each results.json records the lock's sha256 and any installed version
that differs from it (a `make setup-latest` environment, or one built by hand).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path = LOCK_FILE) -> dict[str, str]:
    """{normalised package name: version} of every ``name==version`` line."""
    pins = {}
    for line in path.read_text().splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[_normal(m.group(1))] = m.group(2)
    return pins


def installed_versions() -> dict[str, str]:
    from importlib.metadata import distributions

    return {_normal(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}


def differences(pins: dict[str, str], installed: dict[str, str]) -> dict[str, str]:
    """Pinned packages whose installed version differs (local labels such as +cpu aside), or that are
    missing. Packages the lock does not name (extras not installed by `make setup`) are not reported."""
    found = {}
    for name, want in pins.items():
        have = installed.get(name)
        if have is None:
            continue  # an optional extra this environment does not have (e.g. bench)
        if have.split("+")[0] != want.split("+")[0]:
            found[name] = f"installed {have}, locked {want}"
    return found


@lru_cache(maxsize=1)
def lock_status() -> dict:
    """What results.json records about the environment against the lock."""
    if not LOCK_FILE.is_file():
        return {"lock": None, "lock_sha256": None, "matches_lock": None, "differs": {}}
    differs = differences(read_pins(), installed_versions())
    return {"lock": str(LOCK_FILE), "lock_sha256": hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest(),
            "matches_lock": not differs, "differs": differs}
