from .reference import linears, swiglu_linear

__all__ = ["linears", "swiglu_linear"]
