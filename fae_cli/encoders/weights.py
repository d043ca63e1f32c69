"""Local encoder weight files: safe reading, unwrapping and a content hash of the loaded weights."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fae_cli.errors import FaeError

# Containers that training scripts wrap a state dict in (timm, DINOv2 and DeiT checkpoints).
WRAPPER_KEYS = ("state_dict", "model", "module", "teacher")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch file without unpickling code (`weights_only=True`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FaeError(f"encoder weights file not found: {path}")

    if path.suffix == ".safetensors":
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise FaeError(f"cannot read encoder weights {path}: {error}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise FaeError(f"cannot read encoder weights {path} safely (weights_only=True): {reason}; convert the file to safetensors") from None

    state = _unwrap(state)
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise FaeError(f"{path} contains no state dict of tensors; pass a safetensors file or a .pth state dict")
    return dict(state)


def _unwrap(state: object) -> object:
    while isinstance(state, Mapping):
        inner = next((state[key] for key in WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None)
        if inner is None:
            return state
        state = inner
    return state


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep the entries under `prefix` with the prefix removed; unchanged if none has it."""
    if not any(key.startswith(prefix) for key in state):
        return state
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def describe_load_error(error: RuntimeError) -> str:
    """Condense torch's multi-line `load_state_dict` error to its first problems, at most 300 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    problems = [line for line in lines if line.startswith(("Missing", "Unexpected", "size mismatch"))]
    text = "; ".join(problems or lines[:1])
    return text if len(text) <= 300 else text[:297] + "..."


def hash_state_dict(module: torch.nn.Module) -> str:
    """Return the first 16 hex digits of sha256 over every parameter and buffer, name and bytes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        data = tensor.detach().to("cpu").contiguous()
        digest.update(name.encode("utf-8"))
        digest.update(str(data.dtype).encode("utf-8"))
        digest.update(str(tuple(data.shape)).encode("utf-8"))
        if data.numel():
            digest.update(data.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
