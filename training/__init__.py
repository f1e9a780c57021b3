"""Pretraining: the `train.*` config, data and tokenizer, the engines (PyTorch, DeepSpeed ZeRO), the checkpoint
format and the loop. Imports the model (`hybrid`), never Hugging Face interop (`interop`)."""
from .config import RunConfig, TrainConfig
from .loop import run

__all__ = ["RunConfig", "TrainConfig", "run"]
