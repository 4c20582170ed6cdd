"""A griffe extension for the API pages (``mkdocs.yml`` loads it; mkdocs does not copy it into the site).

* The docstrings under ``vit/`` title their doctests ``Example:`` (what ``--doctest-modules`` and ``help()`` read);
  griffe's google parser only knows ``Examples:``, so the singular is read as the plural here and the doctests
  render as code, not as a note.
* A class made at import time (``Backbone``: its fields come from ``ViTConfig`` through ``make_dataclass`` and its
  docstring adds ``ViTConfig``'s field docs to its own, ``__doc__ = ...``) is invisible to static analysis: such a
  class takes its docstring and its ``__init__`` signature from the imported class.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class VitDocstrings(griffe.Extension):
    def on_class_members(self, *, cls: griffe.Class, agent: Any, **kwargs: Any) -> None:
        if cls.docstring is not None or "__doc__" not in cls.members or not isinstance(agent, griffe.Visitor):
            return
        try:
            runtime = griffe.inspect(cls.module.path)[cls.name]
        except Exception:  # noqa: BLE001 - not importable here: leave it as static analysis saw it
            return
        if runtime.docstring is not None:
            cls.docstring = griffe.Docstring(runtime.docstring.value, lineno=cls.lineno, parent=cls)
        if "__init__" in runtime.members:
            cls.set_member("__init__", runtime.members["__init__"])

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
