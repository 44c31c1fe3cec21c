"""The ``needles`` command: ``app`` builds the parser and runs it; one module per command group registers its subcommands."""

from harness_ext.cli.app import main

__all__ = ["main"]
