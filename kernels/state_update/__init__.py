from .reference import selective_state_update, ssd_state_update

__all__ = ["selective_state_update", "ssd_state_update"]
