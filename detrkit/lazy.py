"""Names a package loads on first use (PEP 562), so `import detrkit` and `detrkit --help` stay fast."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, table: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module `__getattr__`: name -> imported from the relative module table[name] of `package`, then
    kept in `namespace` (the package's globals) so the import happens once."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        namespace[name] = value
        return value

    return __getattr__
