from .reference import ssd_chunk_scan, ssd_sequential

__all__ = ["ssd_chunk_scan", "ssd_sequential"]
