"""Version policies, routing and traffic splits: plain data, no model."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnserve.core.errors import ErrorCode, RequestError
from attnserve.core.versions import VersionPolicy, route, scan, wanted


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (VersionPolicy(), [7]),
        (VersionPolicy(latest=2), [3, 7]),
        (VersionPolicy(latest=10), [1, 3, 7]),
        (VersionPolicy(latest=0), []),
        (VersionPolicy(versions=(1, 7, 9)), [1, 7]),
        (VersionPolicy(all=True), [1, 3, 7]),
    ],
)
def test_a_policy_picks_the_latest_n_a_list_or_all(policy, expected):
    assert policy.select([3, 1, 7]) == expected


@given(st.lists(st.integers(1, 50), max_size=12), st.integers(0, 5))
def test_latest_n_are_the_n_highest_present(available, n):
    chosen = VersionPolicy(latest=n).select(available)
    assert chosen == sorted(set(available))[len(set(available)) - min(n, len(set(available))) :]


def test_scan_lists_version_folders_with_a_manifest_only(tmp_path):
    for folder in ("a/1", "a/2", "a/notes", "b/3", "c/1"):
        (tmp_path / folder).mkdir(parents=True)
    for folder in ("a/1", "a/2", "a/notes", "b/3"):
        (tmp_path / folder / "manifest.json").write_text("{}")
    found = scan(tmp_path)
    assert {name: sorted(v) for name, v in found.items()} == {"a": [1, 2], "b": [3]}
    assert found["a"][2] == tmp_path / "a" / "2"
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "missing")


def test_wanted_applies_overrides_and_the_group():
    available = {"a": {1: "a1", 2: "a2"}, "b": {1: "b1", 5: "b5"}, "c": {4: "c4"}}
    chosen = wanted(available, VersionPolicy(), {"b": VersionPolicy(all=True)}, models=("a", "b"))
    assert chosen == {("a", 2): "a2", ("b", 1): "b1", ("b", 5): "b5"}


def test_a_call_naming_no_version_gets_the_highest_loaded():
    assert route("a", "", {"a": (1, 2)}) == 2


def test_a_call_naming_a_loaded_version_gets_it():
    assert route("a", "1", {"a": (1, 2)}) == 1


@pytest.mark.parametrize(
    ("name", "version", "words"),
    [
        ("z", "", "no model named 'z'; served models: a"),
        ("a", "3", "no version '3' loaded; loaded versions: 1, 2"),
        ("a", "latest", "no version 'latest' loaded; loaded versions: 1, 2"),
    ],
)
def test_unknown_models_and_versions_are_not_found_with_what_is_loaded(name, version, words):
    with pytest.raises(RequestError) as info:
        route(name, version, {"a": (1, 2)})
    assert info.value.code is ErrorCode.NOT_FOUND and words in info.value.message


def test_a_traffic_split_sends_calls_by_weight_to_loaded_versions_only():
    rng = random.Random(0)
    weights = {"a": {1: 0.9, 2: 0.1, 3: 5.0}}  # version 3 is not loaded: ignored
    counts = Counter(route("a", "", {"a": (1, 2)}, weights, rng) for _ in range(5000))
    assert set(counts) == {1, 2} and 0.08 < counts[2] / 5000 < 0.12


def test_a_split_with_no_loaded_version_falls_back_to_the_highest():
    assert route("a", "", {"a": (1, 2)}, {"a": {7: 1.0}}) == 2
