"""Every backend this installation has, found from the classes themselves.

Each module of ``runtime.backends`` is imported once; every ``Backend`` subclass
that names itself is then registered (``Backend.__init_subclass__``). The
automatic order, the configuration's choices and ``doctor``'s table all come
from here, so adding a backend is adding one file.
"""

from __future__ import annotations

import functools

from runtime.backends.base import Backend, BackendError, BackendStatus
from runtime.plugins import import_modules

AUTO = "auto"


@functools.cache
def _import_backend_modules() -> None:
    import_modules("runtime.backends")


def backend_classes() -> list[type[Backend]]:
    """Every registered backend, in the order the automatic choice tries them."""
    _import_backend_modules()
    return sorted(Backend.registered.values(), key=lambda cls: (cls.priority, cls.name))


def backend_names() -> tuple[str, ...]:
    return tuple(cls.name for cls in backend_classes())


def backend_class(name: str) -> type[Backend]:
    for cls in backend_classes():
        if cls.name == name:
            return cls
    raise BackendError(f"unknown backend {name!r}; one of {AUTO}, {', '.join(backend_names())}")


def probe_backends() -> list[BackendStatus]:
    """Each backend's status, in the automatic order."""
    return [cls.probe() for cls in backend_classes()]
