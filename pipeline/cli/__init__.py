"""The ``landmarks`` command line: one entry point, a registry of commands."""
