"""braidlm's model package: layouts, the hybrid model, its cache and generation."""
from .cache import HybridCache
from .generate import SamplingConfig, generate
from .model import HybridLM, lm_loss
from .spec import Layout, LayoutError

__all__ = ["HybridCache", "HybridLM", "Layout", "LayoutError", "SamplingConfig", "generate", "lm_loss", "load_layout"]


def __getattr__(name):
    # imported on first use so that `python -m hybrid.layout` does not load its own module twice
    if name == "load_layout":
        from .layout import load_layout
        return load_layout
    raise AttributeError(f"module 'hybrid' has no attribute {name!r}")
