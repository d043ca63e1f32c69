"""`fae evaluate fid | recon | probe`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fae_cli.cli.app import evaluate_app
from fae_cli.cli.common import DryRunOption, RecipeOption, SetOption, print_dry_run, resolve
from fae_cli.errors import FaeError
from fae_cli.stages.plan import MADE_WHEN_MISSING, Plan, RunPaths

EvalOutOption = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Folder of metrics.json; default: <run.out_dir>/<run.name>/eval/ followed by fid, recon or probe.", show_default=False),
]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", metavar="", help="Replace the metrics.json an earlier evaluation wrote in the output folder.")]


def _check_target(target: Path, overwrite: bool) -> None:
    """Raise a FaeError when `target` contains an earlier metrics.json and `overwrite` is off."""
    existing = target / "metrics.json"
    if existing.is_file() and not overwrite:
        raise FaeError(f"{existing} exists from an earlier evaluation; pass --out with another folder, or --overwrite to replace it")


@evaluate_app.command("fid")
def fid_command(
    samples: Annotated[Path, typer.Argument(help="Image folder or ADM-style .npz (arr_0 uint8 NxHxWx3).")],
    reference: Annotated[Path, typer.Argument(help="Image folder, images .npz, or statistics .npz with mu/sigma.")],
    recipe: RecipeOption = None,
    sets: SetOption = None,
    dry_run: DryRunOption = False,
    metrics: Annotated[str | None, typer.Option(help="Comma-separated metrics: fid,kid,prc,sfid,isc.", show_default=False)] = None,
    out: EvalOutOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """FID (and KID, precision/recall, sFID, IS) of samples against a reference."""
    from fae_cli.evaluation import fid

    names = [name.strip() for name in metrics.split(",") if name.strip()] if metrics is not None else None
    resolved = resolve(recipe, sets, {"evaluate.metrics": ("--metrics", names)})
    target = out or RunPaths.of(resolved).evaluation / "fid"
    if dry_run:
        from fae_cli.stages.pipeline import evaluate_inputs

        inputs = evaluate_inputs(resolved, samples, str(reference))
        print_dry_run(resolved, [Plan("evaluate fid", inputs=inputs, outputs={"metrics": str(target / "metrics.json")})])
        return
    _check_target(target, overwrite)
    fid.run_fid(
        samples,
        reference,
        metrics=resolved.evaluate.metrics,
        batch_size=resolved.evaluate.batch_size,
        out=target,
        weights=resolved.evaluate.inception_weights,
        device=resolved.run.device,
    )


@evaluate_app.command("recon")
def recon_command(
    recipe: RecipeOption = None,
    sets: SetOption = None,
    dry_run: DryRunOption = False,
    decoder: Annotated[Path | None, typer.Option(help="Pixel decoder checkpoint or run folder.", show_default=False)] = None,
    adapter: Annotated[Path | None, typer.Option(help="Adapter checkpoint; omit to decode frozen features directly.", show_default=False)] = None,
    fid: Annotated[bool, typer.Option("--fid/--no-fid", metavar="", help="Also compute rFID (Inception on originals and reconstructions; slow on a CPU).")] = True,
    out: EvalOutOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """PSNR, SSIM and rFID of reconstructions of held-out images."""
    from fae_cli.evaluation import recon

    resolved = resolve(recipe, sets)
    paths = RunPaths.of(resolved)
    target = out or paths.evaluation / "recon"
    if dry_run:
        default_decoder = paths.decoder_finetune if resolved.decoder.finetune else paths.decoder_noise
        print_dry_run(resolved, [Plan("evaluate recon", inputs={"decoder": str(decoder or default_decoder), "adapter": str(adapter or "none")}, outputs={"metrics": str(target)})])
        return
    _check_target(target, overwrite)
    recon.run_recon(resolved, decoder=decoder, adapter=adapter, out=target, fid=fid)


@evaluate_app.command("probe")
def probe_command(
    recipe: RecipeOption = None,
    sets: SetOption = None,
    dry_run: DryRunOption = False,
    features: Annotated[Path | None, typer.Option(help="Labelled feature cache.", show_default=False)] = None,
    adapter: Annotated[Path | None, typer.Option(help="Adapter checkpoint (adds x-hat and z to the comparison).", show_default=False)] = None,
    out: EvalOutOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Linear-probe accuracy of features x, reconstructions x-hat and latents z."""
    from fae_cli.evaluation import probe

    resolved = resolve(recipe, sets)
    paths = RunPaths.of(resolved)
    target = out or paths.evaluation / "probe"
    if dry_run:
        inputs = {
            "features": str(features or paths.features),
            "held-out features": f"{paths.holdout_features} ({MADE_WHEN_MISSING})",
            "adapter": str(adapter or paths.adapter),
        }
        print_dry_run(resolved, [Plan("evaluate probe", inputs=inputs, outputs={"metrics": str(target / "metrics.json")})])
        return
    _check_target(target, overwrite)
    probe.run_probe(resolved, features=features, adapter=adapter, out=target)
