"""Import a script of ``examples/`` as a module (the tests call its ``main(argv)``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """The module ``examples/{name}.py`` (examples/ is put on sys.path once: they import their helpers)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)
