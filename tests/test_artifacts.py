from __future__ import annotations

import json

import pytest

from fae_cli import __version__
from fae_cli.artifacts import check_compatible, describe_changes, read_manifest, write_manifest
from fae_cli.errors import FaeError


def test_manifest_round_trip_with_parent(tmp_path):
    parent = tmp_path / "features"
    write_manifest(parent, "features", recipe_hash="aaaa", command=["fae", "extract"], width=112)
    child = tmp_path / "adapter"
    write_manifest(child, "adapter", recipe_hash="bbbb", parents={"features": parent}, recipe_toml="[run]\n", latent_channels=8)
    manifest = read_manifest(child, "adapter")
    assert manifest["kind"] == "adapter"
    assert manifest["recipe_hash"] == "bbbb"
    assert manifest["fae_version"] == __version__
    assert manifest["latent_channels"] == 8
    assert manifest["parents"]["features"]["kind"] == "features"
    assert manifest["parents"]["features"]["recipe_hash"] == "aaaa"
    assert "created" in manifest
    assert (child / "recipe.toml").read_text() == "[run]\n"
    assert json.loads((parent / "manifest.json").read_text())["command"] == ["fae", "extract"]


def test_manifest_wrong_kind_names_both(tmp_path):
    write_manifest(tmp_path, "generator", recipe_hash="x")
    with pytest.raises(FaeError) as error:
        read_manifest(tmp_path, "adapter")
    assert "'generator'" in str(error.value)
    assert "'adapter'" in str(error.value)


def test_missing_manifest_is_user_error(tmp_path):
    with pytest.raises(FaeError, match="manifest.json"):
        read_manifest(tmp_path)


def test_check_compatible_names_both_values():
    check_compatible("feature width", 112, 112, expected_from="cache", actual_from="adapter")
    with pytest.raises(FaeError) as error:
        check_compatible("feature width", 1536, 112, expected_from="adapter", actual_from="cache")
    assert "1536" in str(error.value)
    assert "112" in str(error.value)


def test_describe_changes_flattens_and_limits():
    before = {"dataset": {"count": 6000, "path": "/a"}, "size": 128, "flip": False, "extra": [1, 2]}
    now = {"dataset": {"count": 500, "path": "/b"}, "size": 64, "flip": False, "extra": (1, 2)}
    assert describe_changes(before, now, ignore=("path",)) == "dataset.count: 6000 there, 500 now; size: 128 there, 64 now"
    assert describe_changes(before, now, limit=1) == "dataset.count: 6000 there, 500 now; and 2 more"
    assert describe_changes({"a": 1}, {"b": None}) == "a: 1 there, unset now"
    assert describe_changes(before, before) == ""
