"""Griffe extension for the API pages: Sphinx roles in docstrings as code.

The library's docstrings name other objects with Sphinx roles (``:func:`field_help```,
``:class:`ConfigError```), which Markdown would show as ``:func:`` followed by code. This keeps
the code and drops the role, on the API pages only; the docstrings stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const|term):`~?([^`]+)`")


def strip_roles(text: str) -> str:
    """``:func:`x``` -> ```x```, for every Sphinx role in ``text``."""
    return ROLE.sub(r"`\1`", text)


class SphinxRoles(griffe.Extension):
    """Rewrites the Sphinx roles of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = strip_roles(obj.docstring.value)
