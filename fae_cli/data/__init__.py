"""fae_cli.data."""
