from .reference import add_rmsnorm_linears, linears, swiglu_linear

__all__ = ["add_rmsnorm_linears", "linears", "swiglu_linear"]
