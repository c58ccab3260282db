"""Plug-ins that find themselves: a class that names itself is registered, and a
package of plug-ins is imported whole, so a new one is one new file.

``runtime.backends`` (inference backends) and ``runtime.head_kinds`` (kinds of
heads) are built this way.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar


class Registered:
    """A base class whose subclasses register themselves under their ``name``.

    Each direct base (``Backend``, ``HeadKind``) sets its own ``registered`` dict;
    a subclass that defines ``name`` is added to it, one class per name.
    """

    name: ClassVar[str]
    registered: ClassVar[dict[str, Any]]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "registered" in cls.__dict__ or "name" not in cls.__dict__:
            return  # a new family, or a shared implementation (OrtBackend)
        known = cls.registered.get(cls.name)
        if known is not None and known is not cls:
            raise TypeError(f"two plug-ins are named {cls.name!r}: {known} and {cls}")
        cls.registered[cls.name] = cls


def import_modules(package: str) -> None:
    """Import every module of ``package``, so that its plug-ins register."""
    root = importlib.import_module(package)
    for module in pkgutil.iter_modules(root.__path__):
        importlib.import_module(f"{package}.{module.name}")
