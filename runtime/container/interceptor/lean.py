"""Start-up: import only the mitmproxy addons transparent mode runs.

Importing any module of the package `mitmproxy.addons` (mitmproxy.master itself
imports `mitmproxy.addons.termlog`) first runs the package's `__init__`, which
imports all ~30 default addons and with them the onboarding app (Flask, Werkzeug,
Jinja2), content views, proxy authentication (ldap3, passlib), clipboard export
(pyperclip) and more: about a third of the interceptor's start-up, all of it unused
here. This finder gives `mitmproxy.addons` a package body of its own: the same
directory (every addon module imports as before, each on its own), and
`default_addons()` still there, running the real `__init__` on first call (for
mitmproxy's own tools, e.g. DumpMaster in tests). The interceptor builds its master
from its own addon list (main.MITMPROXY_ADDONS), so the image can leave out the
packages only the others import (image/runtime-requirements.txt).

Must be installed before anything imports mitmproxy.addons; if that already
happened, nothing changes (the real package stays, everything still works).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

PACKAGE = "mitmproxy.addons"


class _AddonsLoader(importlib.abc.Loader):
    """Executes a package body that imports nothing; keeps the real one for later."""

    def __init__(self, real: importlib.machinery.ModuleSpec) -> None:
        self.real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        real = self.real

        def default_addons() -> list[Any]:
            """mitmproxy's full default addon list: runs the real package body once."""
            loader = real.loader
            if not isinstance(loader, importlib.abc.InspectLoader):
                raise ImportError(f"cannot read {real.origin}")
            exec(loader.get_code(PACKAGE), module.__dict__)  # defines the real one
            return module.default_addons()

        module.default_addons = default_addons  # type: ignore[attr-defined]


class _AddonsFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != PACKAGE:
            return None
        real = importlib.machinery.PathFinder.find_spec(name, path)
        if real is None or real.submodule_search_locations is None:
            return None
        spec = importlib.machinery.ModuleSpec(
            name, _AddonsLoader(real), origin=real.origin, is_package=True
        )
        spec.submodule_search_locations = list(real.submodule_search_locations)
        spec.has_location = real.has_location
        spec.cached = real.cached
        return spec


def install() -> None:
    """Idempotent; before mitmproxy.addons is imported."""
    if not any(isinstance(f, _AddonsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AddonsFinder())


def active() -> bool:
    """Whether mitmproxy.addons was loaded through this module (not its real body)."""
    module = sys.modules.get(PACKAGE)
    return module is not None and isinstance(getattr(module, "__loader__", None), _AddonsLoader)


install()  # on import: the package imports this module before anything of mitmproxy
