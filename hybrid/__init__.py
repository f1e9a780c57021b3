"""braidlm's model package: layouts, the hybrid model, its cache and generation."""
from .cache import HybridCache
from .generate import SamplingConfig, generate
from .layout import load_layout
from .model import HybridLM, lm_loss
from .spec import Layout, LayoutError

__all__ = ["HybridCache", "HybridLM", "Layout", "LayoutError", "SamplingConfig", "generate", "lm_loss", "load_layout"]
