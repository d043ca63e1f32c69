"""The `fae` command line: parses options, loads the recipe and calls a stage function."""
