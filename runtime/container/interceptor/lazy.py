"""Start-up: defer third-party modules mitmproxy imports but this interceptor never uses.

mitmproxy's addon package imports every addon at start, among them proxy
authentication (ldap3, passlib.apache: ~20% of the interceptor's import time). Those
options stay unset here (`proxyauth` is never configured), so the modules are only
executed if something reads an attribute of them (importlib's LazyLoader); until then
readiness comes sooner. Modules imported with `from x import y` load at once anyway,
so only names imported as whole modules belong in LAZY.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

#: Imported by mitmproxy.addons.proxyauth as `import ldap3` / `import passlib.apache`.
LAZY = frozenset({"ldap3", "passlib.apache"})


class _LazyFinder(importlib.abc.MetaPathFinder):
    """Finds LAZY modules through the other finders and wraps their loader."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in LAZY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = importlib.util.LazyLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Idempotent; before mitmproxy is imported."""
    if not any(isinstance(f, _LazyFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _LazyFinder())


install()  # on import: the package imports this module before anything of mitmproxy
