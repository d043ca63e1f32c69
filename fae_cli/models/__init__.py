"""fae_cli.models."""
