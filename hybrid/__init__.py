"""braidlm's model package: layouts, the hybrid model, its cache and generation.

The names below are imported on first use (`from hybrid import HybridLM` works as usual), so that a module that
needs only `hybrid.errors`, such as `python -m training.prepare`, starts without importing torch; and so that
`python -m hybrid.layout` does not load its own module twice."""
import sys
import types
from importlib import import_module

_LAZY = {"HybridCache": ".cache", "SamplingConfig": ".generate", "HybridLM": ".model", "lm_loss": ".model",
         "Layout": ".spec", "LayoutError": ".spec", "load_layout": ".layout"}
__all__ = ["HybridCache", "HybridLM", "Layout", "LayoutError", "SamplingConfig", "generate", "lm_loss", "load_layout"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hybrid' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`hybrid.generate` is the function, as `from hybrid import generate` promises, although a submodule of
    the same name exists: importing the submodule binds it on the package, which this property ignores."""

    @property
    def generate(self):
        return import_module(".generate", __name__).generate

    @generate.setter
    def generate(self, module):
        pass


sys.modules[__name__].__class__ = _Package
