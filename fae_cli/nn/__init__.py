"""fae_cli.nn."""
