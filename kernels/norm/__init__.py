from .reference import add_rmsnorm, rmsnorm, rmsnorm_gated

__all__ = ["add_rmsnorm", "rmsnorm", "rmsnorm_gated"]
