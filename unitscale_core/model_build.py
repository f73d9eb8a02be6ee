"""Cancellable model builds: a job's ``check`` runs each time a module is registered.

``build_model`` builds a model module by module (each layer's linears and norms are assigned
to their parents as they are created, their weights initialised in their constructors), so
checking between registrations bounds a cancel's latency by one module's construction, not
the whole model's (a GPT-3-sized build takes minutes). torch's global module-registration
hook sees every thread's modules; the check runs only for the thread that opened the context,
so a model built elsewhere (the GUI thread's table, another job) is never interrupted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def cancellable_builds(check: Callable[[], None]) -> Iterator[None]:
    """While open, ``check()`` is called in this thread before each submodule is registered
    (``Module.__setattr__`` / ``add_module``); whatever it raises ends the build there and
    propagates to the caller, so no half-built model is returned or kept."""
    # torch imported here, not at import: the GUI imports this module at start-up, torch later
    from torch.nn.modules.module import register_module_module_registration_hook

    owner = threading.get_ident()

    def hook(_parent: Any, _name: str, _child: Any) -> None:
        if threading.get_ident() == owner:
            check()

    handle = register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()
