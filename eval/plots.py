"""Shared helpers of the eval commands: where results go, line plots to PNG, and the markdown results file.

Where results go: every command writes `<name>.md` (and its PNGs beside it) to `runs/eval/<command>/` under
the current directory unless `--out` names another file. The recorded results that the README quotes live in
eval/results/ and are written only when `--out` names them (`--out eval/results/speed.md`).

matplotlib is optional (the `plots` extra): without it `line_plot` draws nothing and `plot_links` writes,
in place of the image links, which plots were not drawn and how to get them; the commands still succeed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from typing import Optional, Sequence

import torch

from hybrid.errors import ConfigError

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PLOTS_INSTALL = 'pip install -e ".[plots]"'


def default_out(command: str, name: str) -> str:
    """The markdown file a command writes without --out: runs/eval/<command>/<name>.md (relative path)."""
    return os.path.join("runs", "eval", command, f"{name}.md")


def add_out_argument(ap: argparse.ArgumentParser, command: str, name: str) -> None:
    """`--out FILE.md` with the run-folder default; the recorded results are written only when named."""
    ap.add_argument("--out", default=default_out(command, name), metavar="FILE.md",
                    help=f"markdown results file, PNGs beside it (default: %(default)s; to update the recorded "
                         f"results pass --out eval/results/{name}.md)")


def check_out(path: str) -> None:
    """Before the work starts: ConfigError when --out is a directory or its folder cannot be created or written."""
    if os.path.isdir(path):
        raise ConfigError(f"--out {path}: is a directory (expected the path of a .md file)")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):   # the nearest existing folder decides whether the rest can be made
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError(f"--out {path}: cannot be written ({folder} is not a writable directory)")


def write_text(path: str, text: str) -> str:
    """Write `text` to `path` (creating its folder), and a copy under $OUT when that is set (the device
    machine's return folder). Returns `path`; a path that cannot be written raises ConfigError naming it."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot write it ({e.strerror or e})") from None
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], os.path.basename(path)), "w") as f:
            f.write(text)
    return path


_warned = False


def _pyplot():
    global _warned
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on servers
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        if not _warned:
            print(f"matplotlib is not installed: no plots drawn ({PLOTS_INSTALL} to get them)", file=sys.stderr)
            _warned = True
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


def command_line(module: str, argv: Optional[Sequence[str]] = None) -> str:
    """`python -m MODULE ARGS...` as typed (quoted for a shell), for the Command: line of a results file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module] + [shlex.quote(a) for a in argv])


def write_result(path: str, title: str, device: torch.device, body: str, argv: Optional[Sequence[str]] = None,
                 module: str = "") -> str:
    """Write `path` (markdown): title, device, torch version, date, the exact command, then `body`. Also
    copies it under $OUT when that is set (the device machine's return folder). Returns the text."""
    cmd = command_line(module, argv) if module else ""
    md = (f"# {title}\n\nDevice: {device_name(device)}; torch {torch.__version__}; "
          f"date {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n\n"
          + (f"Command: `{cmd}`\n\n" if cmd else "") + body.rstrip() + "\n")
    write_text(path, md)
    return md


def png_beside(md_path: str, suffix: str) -> str:
    """The PNG that goes with a results file: eval/results/speed.md -> eval/results/speed_<suffix>.png."""
    return os.path.splitext(md_path)[0] + f"_{suffix}.png"


def plot_links(paths: Sequence[str], alts: Optional[Sequence[str]] = None) -> str:
    """Markdown for the PNGs `line_plot` drew beside a results file (links relative to it, alt text `alts` or
    the file names). Without matplotlib none was drawn: a line names them and says how to get them."""
    names = [os.path.basename(p) for p in paths]
    if _pyplot() is None:
        return (f"Plots not drawn: matplotlib is not installed (`{PLOTS_INSTALL}`, then run the command again "
                "to draw " + ", ".join(f"`{n}`" for n in names) + ").")
    return "\n".join(f"![{a}]({n})" for a, n in zip(alts or names, names))


def pick_device(name: Optional[str]) -> torch.device:
    """--device NAME, or the GPU when there is one. A name that is not a device here raises ConfigError."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); "
                          "use --device cpu")
    return device


def require_positive(**options) -> None:
    """Raise ConfigError naming the first option (given by its argparse dest) with a value <= 0; a value may
    be a number, a list of numbers or None (unset)."""
    for dest, value in options.items():
        bad = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None and v <= 0]
        if bad:
            raise ConfigError(f"--{dest.replace('_', '-')} {bad[0]:g}: expected a positive number")
