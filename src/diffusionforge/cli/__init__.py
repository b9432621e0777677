"""The `dforge` command line."""
