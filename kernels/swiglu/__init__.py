from .reference import swiglu

__all__ = ["swiglu"]
