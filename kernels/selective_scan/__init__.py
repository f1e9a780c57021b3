from .reference import selective_scan, selective_scan_sequential

__all__ = ["selective_scan", "selective_scan_sequential"]
