"""fae_cli.encoders."""
