"""fae_cli.diffusion."""
