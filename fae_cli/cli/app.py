"""The `fae` Typer application and its entry point."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fae_cli import __version__
from fae_cli.cli.common import DryRunOption, RecipeOption, SetOption, print_dry_run, resolve
from fae_cli.errors import FaeError
from fae_cli.log import console, setup_logging

app = typer.Typer(
    name="fae",
    help="Feature Auto-Encoders: small latents from frozen vision encoders, generators on them, and evaluation.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
evaluate_app = typer.Typer(help="Evaluate samples (fid), reconstructions (recon) or features (probe).", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")

log = logging.getLogger("fae_cli")

OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder; default: <run.out_dir>/<run.name>/<stage>.", show_default=False)]


def _version(value: bool) -> None:
    if value:
        console.print(f"fae {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="Verbose logs and full tracebacks.")] = False,
) -> None:
    setup_logging(debug)


# ----------------------------------------------------------------------------------------------
# Stage commands


@app.command("extract")
def extract_command(
    recipe: RecipeOption = None,
    sets: SetOption = None,
    dry_run: DryRunOption = False,
    encoder: Annotated[str | None, typer.Option(help="Encoder registry name (sets encoder.name).", show_default=False)] = None,
    data: Annotated[str | None, typer.Option(help="Image folder, .npz or 'fashion-mnist' (sets data.source).", show_default=False)] = None,
    weights: Annotated[Path | None, typer.Option(help="Local encoder weights (sets encoder.weights).", show_default=False)] = None,
    latents: Annotated[Path | None, typer.Option(help="Adapter checkpoint: write a latent cache instead of features.", show_default=False)] = None,
    split: Annotated[str, typer.Option(help="'train', or 'holdout' (default output <run>/features-holdout).")] = "train",
    out: OutOption = None,
) -> None:
    """Cache frozen encoder features (or FAE latents with --latents) of an image dataset."""
    from fae_cli.stages import extract

    resolved = resolve(recipe, sets, {"encoder.name": ("--encoder", encoder), "data.source": ("--data", data), "encoder.weights": ("--weights", weights)})
    if dry_run:
        print_dry_run(resolved, [extract.plan(resolved, out=out, latents_from=latents, split=split)])
        return
    if latents is not None:
        extract.run_latents(resolved, adapter=latents, out=out)
    else:
        extract.run(resolved, out=out, split=split)


@app.command("train-adapter")
def train_adapter_command(
    recipe: RecipeOption = None,
    sets: SetOption = None,
    dry_run: DryRunOption = False,
    features: Annotated[Path | None, typer.Option(help="Feature cache folder.", show_default=False)] = None,
    out: OutOption = None,
) -> None:
    """Train the FAE adapter (encoder + feature decoder) on a feature cache."""
    from fae_cli.stages import adapter

    resolved = resolve(recipe, sets)
    if dry_run:
        print_dry_run(resolved, [adapter.plan(resolved, features=features, out=out)])
        return
    adapter.run(resolved, features=features, out=out)


@app.command("train-decoders")
def train_decoders_command(
    recipe: RecipeOption = None,
    sets: SetOption = None,
    dry_run: DryRunOption = False,
    phase: Annotated[str, typer.Option(help="'noise' (frozen features + Gaussian noise) or 'finetune' (on adapter reconstructions).")] = "noise",
    features: Annotated[Path | None, typer.Option(help="Feature cache folder.", show_default=False)] = None,
    adapter: Annotated[Path | None, typer.Option(help="Adapter checkpoint for the finetune phase.", show_default=False)] = None,
    out: OutOption = None,
) -> None:
    """Train the pixel decoder: Gaussian-noise phase, then fine-tune on reconstructed features."""
    from fae_cli.stages import decoders

    if phase not in ("noise", "finetune"):
        raise FaeError(f"invalid --phase {phase!r}: use 'noise' or 'finetune'")
    resolved = resolve(recipe, sets)
    if dry_run:
        print_dry_run(resolved, [decoders.plan(resolved, phase=phase, features=features, adapter=adapter, out=out)])
        return
    decoders.run(resolved, phase=phase, features=features, adapter=adapter, out=out)


@app.command("train-generator")
def train_generator_command(
    recipe: RecipeOption = None,
    sets: SetOption = None,
    dry_run: DryRunOption = False,
    family: Annotated[str | None, typer.Option(help="'diffusion' or 'flow' (sets generator.family).", show_default=False)] = None,
    latents: Annotated[Path | None, typer.Option(help="Latent cache folder.", show_default=False)] = None,
    out: OutOption = None,
) -> None:
    """Train a latent generator (diffusion transformer or normalizing flow)."""
    from fae_cli.stages import generator

    resolved = resolve(recipe, sets, {"generator.family": ("--family", family)})
    if dry_run:
        print_dry_run(resolved, [generator.plan(resolved, latents=latents, out=out)])
        return
    generator.run(resolved, latents=latents, out=out)


@app.command("sample")
def sample_command(
    recipe: RecipeOption = None,
    sets: SetOption = None,
    dry_run: DryRunOption = False,
    num: Annotated[int | None, typer.Option("-n", "--num-samples", help="Number of samples (sets sample.num_samples).", show_default=False)] = None,
    cfg: Annotated[float | None, typer.Option("--cfg", help="One guidance scale over the recipe's guidance intervals (sets sample.cfg_scale).", show_default=False)] = None,
    generator: Annotated[Path | None, typer.Option(help="Generator checkpoint or run folder.", show_default=False)] = None,
    adapter: Annotated[Path | None, typer.Option(help="Adapter checkpoint; default: the one the generator's latents came from.", show_default=False)] = None,
    decoder: Annotated[Path | None, typer.Option(help="Pixel decoder checkpoint; default: the run's fine-tuned, else noise-phase decoder.", show_default=False)] = None,
    out: OutOption = None,
) -> None:
    """Generate images: generator -> latent -> feature decoder -> pixel decoder."""
    from fae_cli.stages import sample

    resolved = resolve(recipe, sets, {"sample.num_samples": ("--num-samples", num), "sample.cfg_scale": ("--cfg", cfg)})
    if dry_run:
        print_dry_run(resolved, [sample.plan(resolved, generator=generator, out=out)])
        return
    sample.run(resolved, generator=generator, out=out, adapter=adapter, decoder=decoder)


# ----------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a FaeError prints one line and exits with its status, 2 for invalid input.

    With --debug the traceback is shown instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        # Standalone mode turns usage errors into click's message and exit status 2.
        app(args=args, prog_name="fae", standalone_mode=True)
    except FaeError as error:
        if debug:
            raise
        console.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)


# Imported last so that their commands register on `app` and `evaluate_app`.
from fae_cli.cli import evaluate as _evaluate  # noqa: E402,F401
from fae_cli.cli import run as _run  # noqa: E402,F401
