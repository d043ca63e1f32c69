"""Checkpoints as safetensors only: weights, EMA weights and the full training state.

Layout of one checkpoint folder (`<run>/checkpoints/step-00001200/`):
  model.safetensors  weights, header metadata: fae.format, fae.kind, fae.step, fae.recipe, ...
  ema.safetensors    EMA weights (when the stage keeps an EMA)
  state.safetensors  AdamW moments, RNG states and extra tensors; the optimizer's parameter
                     groups, the LR-schedule state, the step and the data-order position are
                     JSON in the header metadata.
A checkpoint is written into a hidden temporary folder, each file fsynced, then renamed into
place; only then does the `latest` pointer file move (itself replaced atomically). A crash at
any point leaves the previous checkpoint and pointer intact. Nothing here unpickles.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fae_cli.artifacts import _fsync_dir, atomic_write_bytes, atomic_write_text
from fae_cli.errors import FaeError

FORMAT = "fae-checkpoint-1"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.safetensors"


# ----------------------------------------------------------------------------------------------
# Model unwrapping and state-dict keys


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return the module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def clean_key(key: str) -> str:
    """Drop the `module.` and `_orig_mod.` parts that DDP and torch.compile add to names."""
    parts = key.split(".")
    while parts and parts[0] in ("module", "_orig_mod"):
        parts = parts[1:]
    return ".".join(part for part in parts if part != "_orig_mod")


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (
        tensor.device.type,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def deduplicate(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into unique tensors and an alias map {alias name: stored name}.

    Tied weights (two names for one tensor) are stored once; safetensors refuses shared memory.
    A tensor that only partly overlaps another is copied, so each stored entry is independent.
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name in sorted(state):
        tensor = state[name]
        key = _storage_key(tensor)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor.detach().to("cpu").contiguous().clone()
    return unique, aliases


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's state dict with wrapper prefixes removed."""
    return {clean_key(k): v for k, v in unwrap_model(model).state_dict().items()}


# ----------------------------------------------------------------------------------------------
# safetensors files with JSON metadata


def encode_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """Encode metadata values as JSON, since safetensors headers hold strings only."""
    return {str(key): json.dumps(value) for key, value in metadata.items()}


def decode_metadata(metadata: dict[str, str] | None) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value  # a plain string written by another tool
    return decoded


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write tensors and JSON metadata to a safetensors file atomically."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write_bytes(Path(path), st_save(tensors, metadata=encode_metadata(metadata)))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file: tensors on CPU and decoded metadata."""
    path = Path(path)
    if not path.is_file():
        raise FaeError(f"checkpoint file not found: {path}")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
    except SafetensorError as error:
        raise FaeError(f"invalid safetensors file {path}: {error}") from None
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return tensors, decode_metadata(header.get("__metadata__"))


# ----------------------------------------------------------------------------------------------
# Optimizer, scheduler and RNG state


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    groups = []
    for group in state["param_groups"]:
        clean = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not _jsonable(value):
                raise TypeError(f"optimizer group setting {key!r} is not JSON-serialisable")
            clean[key] = value
        groups.append(clean)
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = tensor
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """Return the JSON-serialisable part of an LR scheduler's state (lambdas are code, not state)."""
    return {key: value for key, value in scheduler.state_dict().items() if _jsonable(value)}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Capture the CPU, CUDA, NumPy and Python RNG states."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = cuda_state
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    meta = {
        "numpy": [algorithm, int(pos), int(has_gauss), float(cached)],
        "python": _tuples_to_lists(random.getstate()),
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = sorted(name for name in tensors if name.startswith("rng.cuda."))
    if cuda_states and torch.cuda.is_available():
        for name in cuda_states:
            index = int(name.rsplit(".", 1)[1])
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(tensors[name], index)
    algorithm, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().view(np.uint32)
    np.random.set_state((algorithm, keys, pos, has_gauss, cached))
    random.setstate(_lists_to_tuples(meta["python"]))


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_tuples_to_lists(item) for item in value]
    return value


def _lists_to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_lists_to_tuples(item) for item in value)
    return value


# ----------------------------------------------------------------------------------------------
# Whole checkpoints


@dataclass
class Checkpoint:
    """A loaded checkpoint: its folder, kind, step, metadata and training extras."""

    path: Path
    kind: str
    step: int
    metadata: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    has_ema: bool = False
    has_state: bool = False


def _header(kind: str, step: int, recipe_toml: str | None, metadata: dict[str, Any] | None) -> dict[str, Any]:
    header = {"fae.format": FORMAT, "fae.kind": kind, "fae.step": int(step)}
    if recipe_toml is not None:
        header["fae.recipe"] = recipe_toml
    for key, value in (metadata or {}).items():
        header[key] = value
    return header


def save_weights(path: Path, model: torch.nn.Module | dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """Save a model's (or a state dict's) weights with tied tensors stored once."""
    state = model_state(model) if isinstance(model, torch.nn.Module) else {clean_key(k): v for k, v in model.items()}
    unique, aliases = deduplicate(state)
    write_safetensors(path, unique, {**header, "fae.aliases": aliases})


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a weights file into a full state dict (aliases of tied tensors restored)."""
    tensors, metadata = read_safetensors(path)
    tensors = {clean_key(k): v for k, v in tensors.items()}
    for alias, stored in metadata.get("fae.aliases", {}).items():
        tensors[alias] = tensors[stored]
    return tensors, metadata


def save_checkpoint(
    run_dir: str | Path,
    *,
    kind: str,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, Any] | None = None,
    recipe_toml: str | None = None,
    keep: int | None = None,
) -> Path:
    """Write a complete checkpoint of step `step` and move the `latest` pointer to it.

    `extra` is JSON training state (e.g. the data-order position); `extra_tensors` contains
    additional tensors such as a second model's optimizer moments. Returns the folder written.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(step):08d}"
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    header = _header(kind, step, recipe_toml, metadata)

    save_weights(tmp / MODEL_FILE, model, header)
    if ema is not None:
        save_weights(tmp / EMA_FILE, ema, header)

    state_tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, Any] = {**header, "fae.extra": extra or {}}
    rng_tensors, rng_meta = capture_rng()
    state_tensors.update(rng_tensors)
    state_meta["fae.rng"] = rng_meta
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        state_tensors.update(opt_tensors)
        state_meta["fae.optimizer"] = opt_meta
    if scheduler is not None:
        state_meta["fae.scheduler"] = scheduler_state(scheduler)
    for key, tensor in (extra_tensors or {}).items():
        state_tensors[f"extra.{key}"] = tensor
    write_safetensors(tmp / STATE_FILE, state_tensors, state_meta)

    final = root / name
    if final.exists():  # a rerun of the same step: replace it, keeping `latest` valid meanwhile
        old = root / f".{name}.old"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, name + "\n")

    if keep is not None:
        _prune(root, keep, current=name)
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for path in steps[:-keep] if keep > 0 else steps:
        if path.name != current:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Return the checkpoint folder that `latest` names, or None when there is none."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text(encoding="utf-8").strip()
    return folder if (folder / MODEL_FILE).is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a run folder or its `checkpoints/` folder; return the folder."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    for run_dir in (path, path.parent):
        found = latest_checkpoint(run_dir)
        if found is not None and (path.name != CHECKPOINTS or run_dir == path.parent):
            return found
    raise FaeError(f"no checkpoint found at {path}: expected a folder with {MODEL_FILE} or a run folder with {CHECKPOINTS}/{LATEST}")


def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    """Return the metadata of a checkpoint's weights file without loading the tensors."""
    folder = resolve_checkpoint(path)
    data = (folder / MODEL_FILE).read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    return decode_metadata(json.loads(data[8 : 8 + header_len]).get("__metadata__"))


def load_checkpoint(
    path: str | Path,
    *,
    expect_kind: str | tuple[str, ...],
    model: torch.nn.Module | None = None,
    ema: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng_state: bool = False,
    use_ema_as_model: bool = False,
) -> Checkpoint:
    """Load a checkpoint into the given objects, strictly, after checking its kind.

    With `use_ema_as_model`, the EMA weights (when present) are loaded into `model`.
    """
    folder = resolve_checkpoint(path)
    weights_file = folder / MODEL_FILE
    ema_file = folder / EMA_FILE
    if use_ema_as_model and ema_file.is_file():
        weights_file = ema_file
    state, metadata = load_weights(weights_file)
    kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
    kind = metadata.get("fae.kind")
    if kind not in kinds:
        expected = " or ".join(repr(k) for k in kinds)
        raise FaeError(f"{folder} is a {kind!r} checkpoint, expected {expected}")

    if model is not None:
        _load_strict(unwrap_model(model), state, weights_file)
    if ema is not None:
        if not ema_file.is_file():
            raise FaeError(f"{folder} has no {EMA_FILE}, but EMA weights were requested")
        ema_state, _ = load_weights(ema_file)
        _load_strict(unwrap_model(ema), ema_state, ema_file)

    checkpoint = Checkpoint(
        path=folder,
        kind=kind,
        step=int(metadata.get("fae.step", 0)),
        metadata=metadata,
        has_ema=ema_file.is_file(),
        has_state=(folder / STATE_FILE).is_file(),
    )
    if checkpoint.has_state:
        tensors, state_meta = read_safetensors(folder / STATE_FILE)
        checkpoint.extra = state_meta.get("fae.extra", {})
        checkpoint.extra_tensors = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        if optimizer is not None:
            if "fae.optimizer" not in state_meta:
                raise FaeError(f"{folder} has no optimizer state")
            optimizer.load_state_dict(optimizer_from_tensors(tensors, state_meta["fae.optimizer"]))
        if scheduler is not None and "fae.scheduler" in state_meta:
            scheduler.load_state_dict({**scheduler.state_dict(), **state_meta["fae.scheduler"]})
        if restore_rng_state:
            restore_rng(tensors, state_meta["fae.rng"])
    return checkpoint


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = set(model_state(module))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]})")
        raise FaeError(f"{source} does not match the model: {', '.join(parts)}; was it trained with other settings?")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[-1] if first else "")
        raise FaeError(f"{source} does not match the model: {detail}") from None
