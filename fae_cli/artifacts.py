"""Artefact folders: `manifest.json` (what produced a folder) and compatibility checks.

Every stage output is a folder holding its files, `manifest.json` and `recipe.toml`. The
manifest names the producing command, the recipe hash, the parent artefacts, the fae version,
the creation time, and stage-specific facts (encoder, feature width, grid, latent width, ...)
that the next stage checks before it reads the folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from fae_cli import __version__
from fae_cli.errors import FaeError

MANIFEST = "manifest.json"
RECIPE_FILE = "recipe.toml"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the complete new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_manifest(
    folder: str | Path,
    kind: str,
    *,
    recipe_hash: str,
    parents: dict[str, str | Path] | None = None,
    recipe_toml: str | None = None,
    command: list[str] | None = None,
    **facts: Any,
) -> dict[str, Any]:
    """Write `manifest.json` (and `recipe.toml` when given) into an artefact folder.

    `parents` maps a role ("features", "adapter", ...) to a parent folder; the parent's kind and
    recipe hash are copied so that a later check can tell whether the parent was replaced.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parent_entries = {}
    for role, parent in (parents or {}).items():
        entry: dict[str, Any] = {"path": str(Path(parent).resolve())}
        parent_manifest = Path(parent) / MANIFEST
        if parent_manifest.is_file():
            data = json.loads(parent_manifest.read_text(encoding="utf-8"))
            entry["kind"] = data.get("kind")
            entry["recipe_hash"] = data.get("recipe_hash")
        parent_entries[role] = entry
    manifest = {
        "kind": kind,
        "command": command if command is not None else list(sys.argv),
        "recipe_hash": recipe_hash,
        "parents": parent_entries,
        "fae_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **facts,
    }
    if recipe_toml is not None:
        atomic_write_text(folder / RECIPE_FILE, recipe_toml)
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(folder: str | Path, expect_kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read an artefact's manifest, checking its kind when `expect_kind` is given."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FaeError(f"no {MANIFEST} in {folder}: not a fae artefact folder, or its stage did not finish")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise FaeError(f"invalid {path}: {error}") from None
    if expect_kind is not None:
        kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
        if manifest.get("kind") not in kinds:
            expected = " or ".join(repr(kind) for kind in kinds)
            raise FaeError(f"{folder} is a {manifest.get('kind')!r} artefact, expected {expected}")
    return manifest


def check_compatible(what: str, expected: Any, actual: Any, *, expected_from: str, actual_from: str) -> None:
    """Raise a FaeError naming both values when two artefacts disagree on `what`."""
    if expected != actual:
        raise FaeError(
            f"{what} mismatch: {expected_from} has {expected!r} but {actual_from} has {actual!r}; "
            "use artefacts produced from the same encoder and settings"
        )


def describe_changes(before: dict[str, Any], now: dict[str, Any], *, limit: int = 3, ignore: tuple[str, ...] = ()) -> str:
    """Name the settings that differ between two (nested) settings dicts, one short clause each.

    Nested tables are flattened to dotted keys, so a changed dataset size reads
    "dataset.count: 6000 there, 500 now" rather than two whole dicts. Keys in `ignore` (at
    any depth) are left out. Returns "" when nothing differs.
    """
    old, new = _flatten(before, ignore), _flatten(now, ignore)
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    listed = "; ".join(f"{key}: {_short(old.get(key))} there, {_short(new.get(key))} now" for key in keys[:limit])
    more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
    return listed + more


def _flatten(data: Any, ignore: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ignore:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, ignore, name + "."))
        else:
            # JSON round trip: a tuple now equals the list it reads back as.
            flat[name] = json.loads(json.dumps(value, default=str))
    return flat


def _short(value: Any) -> str:
    text = "unset" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
