from .reference import attention, attention_with_cache, token_positions, visible

__all__ = ["attention", "attention_with_cache", "token_positions", "visible"]
