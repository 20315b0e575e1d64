"""The ``rolebus`` command: ``app`` (the Typer app and shared options), one module
per command group, ``main`` (the entry point, which imports them all).
"""
