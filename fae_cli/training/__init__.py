"""fae_cli.training."""
