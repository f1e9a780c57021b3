from .reference import rmsnorm, rmsnorm_gated

__all__ = ["rmsnorm", "rmsnorm_gated"]
