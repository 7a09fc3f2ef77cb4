"""The error every analysis command raises for bad input; ``python -m analysis`` prints it on one line and
exits with code 2."""

from __future__ import annotations


class AnalysisError(ValueError):
    """A bad command-line value or input file: the message names it and what was expected."""
