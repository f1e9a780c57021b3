from .reference import rope

__all__ = ["rope"]
