"""The repository's example scripts (``examples/*.py``) imported as modules, for the tests that
check them against PyTorch. Importing an example imports what it imports (``bert.py``:
transformers): only a module that has already skipped without those imports this one's
`load_example`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module, loaded once per process (kept in ``sys.modules`` as
    ``flax_lora_example_<name>``)."""
    key = f"flax_lora_example_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
