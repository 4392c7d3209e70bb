"""requirements.lock pins, with hashes, a set of packages that satisfies pyproject.toml (`make lock` refreshes it)."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
# The extras `make setup` installs (`.[test]`); the lock is resolved for them.
LOCKED_EXTRAS = ("test",)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;\s*(.+?))?\s*\\?$")


def parse_lock(text: str) -> dict[str, tuple[Version, list[str]]]:
    """Canonical name -> (pinned version, its sha256 hashes), from pip-compile's --generate-hashes format."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            assert current not in pins, f"requirements.lock pins {current} twice"
            pins[current] = (Version(match.group(2)), [])
        elif line.startswith("--hash=sha256:"):
            assert current is not None, f"requirements.lock: a hash before any pin: {line}"
            pins[current][1].append(line.split(":", 1)[1].rstrip(" \\"))
        else:
            raise AssertionError(f"requirements.lock: unexpected line {line!r} (only pins and hashes)")
    return pins


def pyproject_requirements() -> list[Requirement]:
    """The requirements `pip install -e '.[test]'` resolves: the dependencies and the locked extras."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in LOCKED_EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def unsatisfied(reqs: list[Requirement], pins: dict[str, tuple[Version, list[str]]]) -> list[str]:
    """One line per requirement the pins do not satisfy (missing, or a version outside its specifier)."""
    problems = []
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is not pinned in requirements.lock")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{req} is not satisfied by the lock's {name}=={pins[name][0]}")
    return problems


def test_lock_satisfies_pyproject():
    pins = parse_lock(LOCK.read_text())
    problems = unsatisfied(pyproject_requirements(), pins)
    assert not problems, "run `make lock`: " + "; ".join(problems)


def test_every_pin_has_a_hash_and_torch_is_the_cpu_build():
    pins = parse_lock(LOCK.read_text())
    assert [name for name, (_, hashes) in pins.items() if not hashes] == []
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for _, hashes in pins.values() for h in hashes)
    # A torch without the +cpu label is the multi-GB CUDA build; the lock must never name it.
    assert pins["torch"][0].local == "cpu", pins["torch"][0]
    # setuptools builds the editable mintbuild without build isolation (the Makefile), so it must be pinned.
    assert "setuptools" in pins


def test_lock_is_closed_under_the_installed_dependencies():
    """Every pinned package installed here at its pinned version has its own requirements pinned and met."""
    pins = parse_lock(LOCK.read_text())
    checked = 0
    for name, (version, _) in pins.items():
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        if Version(dist.version) != version:
            continue
        checked += 1
        reqs = [Requirement(r) for r in dist.requires or []]
        reqs = [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
        problems = unsatisfied(reqs, pins)
        assert not problems, f"{name}=={version}: " + "; ".join(problems)
    assert checked > len(pins) // 2, f"only {checked} of {len(pins)} pins are installed here at their version"


def test_a_lock_that_breaks_pyproject_is_caught():
    """The checker itself: a pin outside its range and a missing pin are both reported."""
    pins = parse_lock(LOCK.read_text())
    reqs = pyproject_requirements()
    numpy_floor = next(r for r in reqs if r.name == "numpy").specifier
    bad = dict(pins)
    bad["numpy"] = (Version("1.26.4"), ["0" * 64])
    assert not numpy_floor.contains("1.26.4")
    del bad["tqdm"]
    problems = unsatisfied(reqs, bad)
    assert any("numpy" in p and "1.26.4" in p for p in problems), problems
    assert any(p.startswith("tqdm") and "not pinned" in p for p in problems), problems
