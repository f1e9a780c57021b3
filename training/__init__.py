"""Pretraining: the `train.*` config, data and tokenizer, the engines (PyTorch, DeepSpeed ZeRO), the checkpoint
format and the loop. Imports the model (`hybrid`), never Hugging Face interop (`interop`).

The names below are imported on first use, so that `python -m training.prepare` (which needs neither torch nor the
model) starts without importing torch."""
from importlib import import_module

_LAZY = {"RunConfig": ".config", "TrainConfig": ".config", "run": ".loop"}
__all__ = ["RunConfig", "TrainConfig", "run"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
