"""Which versions of each model to serve, and which version answers a call: policy as plain data.

The repository keeps `<model>/<version>/` folders (`scan` lists them without loading anything).
A `VersionPolicy` picks the versions of one model to load, as Triton's version policies do: the
latest N, a list, or all. A call names a version, or leaves it empty for the model's default:
the traffic split by weight where one is set (a canary), else the highest loaded version.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from attnserve.core.errors import ErrorCode, RequestError
from attnserve.core.manifest import MANIFEST_FILE


@dataclass(frozen=True)
class VersionPolicy:
    """The versions of one model to serve.

    latest: the highest `latest` versions (used when `versions` is empty and `all` is off).
    versions: exactly these versions (those present in the repository).
    all: every version in the repository.
    """

    latest: int = 1
    versions: tuple[int, ...] = ()
    all: bool = False

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of those in the repository, ascending."""
        ordered = sorted(set(available))
        if self.all:
            return ordered
        if self.versions:
            return [v for v in ordered if v in self.versions]
        return ordered[-self.latest :] if self.latest > 0 else []


def scan(repository: Path) -> dict[str, dict[int, Path]]:
    """Every model's version folders holding a manifest: name -> version -> folder.

    Raises:
        FileNotFoundError: if the repository is not a folder.
    """
    repository = Path(repository)
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository {repository} does not exist")
    found: dict[str, dict[int, Path]] = {}
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = {
            int(v.name): v
            for v in model_dir.iterdir()
            if v.is_dir() and v.name.isdigit() and (v / MANIFEST_FILE).is_file()
        }
        if versions:
            found[model_dir.name] = versions
    return found


def latest(repository: Path, name: str) -> Path:
    """The folder of a model's highest version, the one served by default.

    Raises:
        FileNotFoundError: if the repository is not a folder.
        KeyError: if the repository holds no version of the model.
    """
    versions = scan(repository)[name]
    return versions[max(versions)]


def wanted(
    available: Mapping[str, Mapping[int, Path]],
    policy: VersionPolicy,
    overrides: Mapping[str, VersionPolicy] | None = None,
    models: tuple[str, ...] = (),
) -> dict[tuple[str, int], Path]:
    """(model, version) -> folder of everything to serve.

    Args:
        available: what `scan` found.
        policy: the policy of every model without an override.
        overrides: a policy per model name.
        models: the models of this group; empty for every model in the repository.
    """
    overrides = overrides or {}
    chosen = {}
    for name, versions in available.items():
        if models and name not in models:
            continue
        for version in overrides.get(name, policy).select(list(versions)):
            chosen[(name, version)] = versions[version]
    return chosen


def route(
    name: str,
    version: str,
    loaded: Mapping[str, tuple[int, ...]],
    weights: Mapping[str, Mapping[int, float]] | None = None,
    rng: random.Random | None = None,
) -> int:
    """The version of `name` that answers a call naming `version` ("" for the default).

    Args:
        name: the model the call names.
        version: the version the call names, or "" for the default.
        loaded: the loaded versions of each model.
        weights: per model, a traffic weight per version for calls without a version (a canary);
            versions not loaded are skipped; without weights the highest loaded version answers.
        rng: the random source of the traffic split.

    Raises:
        RequestError: NOT_FOUND for an unknown model or version, naming what is loaded.
    """
    versions = loaded.get(name)
    if not versions:
        served = ", ".join(sorted(loaded)) or "none"
        raise RequestError(ErrorCode.NOT_FOUND, f"no model named {name!r}; served models: {served}")
    if version:
        if version.isdigit() and int(version) in versions:
            return int(version)
        shown = ", ".join(map(str, sorted(versions)))
        raise RequestError(
            ErrorCode.NOT_FOUND, f"model {name!r} has no version {version!r} loaded; loaded versions: {shown}"
        )
    split = shares(versions, (weights or {}).get(name))
    if len(split) == 1:
        return next(iter(split))
    choices, parts = zip(*split.items(), strict=True)
    return (rng or random).choices(choices, parts)[0]


def shares(versions: tuple[int, ...], weights: Mapping[int, float] | None) -> dict[int, float]:
    """Share (0..1) of a model's calls naming no version that each loaded version answers: its
    traffic weights over the loaded versions, or everything to the highest without any.

    Args:
        versions: the model's loaded versions (not empty).
        weights: a traffic weight per version, or None.
    """
    split = {v: w for v, w in sorted((weights or {}).items()) if v in versions and w > 0}
    if not split:
        return {max(versions): 1.0}
    total = sum(split.values())
    return {v: w / total for v, w in split.items()}
