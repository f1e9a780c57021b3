from .reference import attention, attention_decode, attention_with_cache, cache_visible, token_positions, visible

__all__ = ["attention", "attention_decode", "attention_with_cache", "cache_visible", "token_positions", "visible"]
