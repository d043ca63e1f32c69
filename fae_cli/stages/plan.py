"""Artefact folders of a run and the plans that `--dry-run` prints, derived from the recipe alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fae_cli.recipe import Recipe


@dataclass(frozen=True)
class RunPaths:
    """The artefact folders of one run: `<run.out_dir>/<run.name>/<stage>`."""

    root: Path

    @classmethod
    def of(cls, recipe: Recipe) -> RunPaths:
        return cls(Path(recipe.run.out_dir) / recipe.run.name)

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def holdout_features(self) -> Path:
        return self.root / "features-holdout"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def decoder_noise(self) -> Path:
        return self.root / "decoder-noise"

    @property
    def decoder_finetune(self) -> Path:
        return self.root / "decoder-finetune"

    @property
    def latents(self) -> Path:
        return self.root / "latents"

    @property
    def generator(self) -> Path:
        return self.root / "generator"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def evaluation(self) -> Path:
        return self.root / "eval"


# Plan inputs whose text contains this are made by the stage itself when they do not exist.
MADE_WHEN_MISSING = "made first when missing"


@dataclass
class Plan:
    """Inputs, outputs and notes of one stage, as `--dry-run` prints them."""

    stage: str
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# Recipe sections each stage's output depends on, upstream stages included: a change to any of
# them makes the stored output stale, while a change elsewhere (e.g. sampling steps) does not.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "features": ("data", "encoder", "extract"),
    "adapter": ("data", "encoder", "extract", "adapter"),
    "decoder-noise": ("data", "encoder", "extract", "decoder"),
    "decoder-finetune": ("data", "encoder", "extract", "adapter", "decoder"),
    "latents": ("data", "encoder", "extract", "adapter"),
    "generator": ("data", "encoder", "extract", "adapter", "generator"),
    "samples": ("data", "encoder", "extract", "adapter", "decoder", "generator", "sample"),
    "evaluation": ("data", "encoder", "extract", "adapter", "decoder", "generator", "sample", "evaluate"),
}


def stage_hash(recipe: Recipe, stage: str) -> str:
    """Return the hash of the recipe values that `stage`'s output depends on (plus the seed)."""
    import hashlib
    import json

    from fae_cli.recipe import recipe_dict

    data = recipe_dict(recipe)
    selected = {name: data[name] for name in STAGE_SECTIONS[stage]}
    selected["seed"] = data["run"]["seed"]
    canonical = json.dumps(selected, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
