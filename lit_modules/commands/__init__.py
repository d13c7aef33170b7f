"""One module per `moelab` subcommand (see lit_modules/cli.py)."""
