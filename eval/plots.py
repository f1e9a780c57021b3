"""Shared helpers of the eval commands: line plots to PNG and the markdown results file.

matplotlib is optional (the `eval` extra): without it `line_plot` prints why and returns None, and the
commands still write their tables.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from typing import Optional, Sequence

import torch


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on servers
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[eval]'): no plot written", file=sys.stderr)
        return None


def line_plot(path: str, series: dict, *, xlabel: str, ylabel: str, title: str = "", logx: bool = False,
              logy: bool = False, hline: Optional[float] = None,
              ylim: Optional[tuple] = None) -> Optional[str]:
    """One PNG with a line per series. series: {label: (xs, ys)}; None / NaN ys (a run that did not fit) are
    left out of that line. Returns the path written, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and y == y]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3.5, label=str(label))
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    if os.environ.get("OUT"):  # the device machine's return folder
        fig.savefig(os.path.join(os.environ["OUT"], os.path.basename(path)))
    plt.close(fig)
    return path


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_result(path: str, title: str, device: torch.device, body: str, argv: Optional[Sequence[str]] = None,
                 module: str = "") -> str:
    """Write `path` (markdown): title, device, torch version, date, the exact command, then `body`. Also
    copies it under $OUT when that is set (the device machine's return folder). Returns the text."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd = " ".join(["python", "-m", module] + [shlex.quote(a) for a in argv]) if module else ""
    md = (f"# {title}\n\nDevice: {device_name(device)}; torch {torch.__version__}; "
          f"date {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n\n"
          + (f"Command: `{cmd}`\n\n" if cmd else "") + body.rstrip() + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(md)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], os.path.basename(path)), "w") as f:
            f.write(md)
    return md


def png_beside(md_path: str, suffix: str) -> str:
    """The PNG that goes with a results file: eval/results/speed.md -> eval/results/speed_<suffix>.png."""
    return os.path.splitext(md_path)[0] + f"_{suffix}.png"


def pick_device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
