from .reference import moe_experts

__all__ = ["moe_experts"]
