"""Hugging Face interop: export a checkpoint as a transformers model directory (self-contained remote code, or a
native architecture where the layout maps onto one) and import one back. Imports the model (`hybrid`) and the
checkpoint format (`training.checkpoint`)."""
