"""Lightning glue: modules, data, callbacks, strategies, checkpoint interop, the CLI."""
