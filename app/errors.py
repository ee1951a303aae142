"""The CLI's own error: a runtime failure worth one line to the user.

It lives outside app/cli.py because under ``python -m app.cli`` that module runs as
``__main__``: a class defined there would be a second CLIError, different from the one
the commands raise, and their messages would lose their one-line form.
"""
from __future__ import annotations


class CLIError(Exception):
    """A runtime error worth one line to the user."""
