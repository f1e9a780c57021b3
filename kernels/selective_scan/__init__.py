from .reference import selective_scan, selective_scan_sequential, selective_state_update

__all__ = ["selective_scan", "selective_scan_sequential", "selective_state_update"]
