"""Where each stage of a run reads and writes, derived from the recipe alone."""

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


@dataclass
class Plan:
    """What a stage would read and write."""

    stage: str
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
