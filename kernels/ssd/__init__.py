from .reference import ssd_chunk_scan, ssd_sequential, ssd_state_update

__all__ = ["ssd_chunk_scan", "ssd_sequential", "ssd_state_update"]
