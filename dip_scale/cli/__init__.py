"""Command-line entry points: one module per command, each with main(argv=None) -> exit code (console scripts in setup.cfg)."""
