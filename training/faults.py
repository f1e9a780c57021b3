"""What a run does when it is asked to stop, or when a step goes bad.

Stop requests. SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before they kill a job) and SIGINT (Ctrl-C)
ask the run to stop: the step in progress finishes, one checkpoint is written and its path printed, and
train.py exits with status PREEMPTED (75, "try again") and no traceback; rerunning the same command
(`train.resume=auto`) continues from that checkpoint. A second signal exits at once (status 128 + signal).
`train.max_wall_time` makes the same request by itself once the run has lasted that long. Ranks stop at the
same step: after every step each rank's request is combined over all ranks (a max over a gloo group), so a
signal that reaches one rank first still stops every rank there.

Bad steps. A step whose loss or global gradient norm is not finite is skipped: its update is not applied
(torch engine: on the GPU the fused AdamW is told so on the device, without a host sync; on the CPU the
update is not called; DeepSpeed: its overflow check skips it on every rank). Skipped steps are counted and logged; `train.max_bad_steps` of them in a row stop the
run with BadStepsError, the last checkpoint untouched (its weights never saw them).

Loss spikes (`train.spike_factor`, off by default). A finite loss above factor x its running mean sends the run
back to the newest checkpoint saved before that step; the steps since are redone on the same data and the
spike's batch is skipped (`train.max_rollbacks` times per run at most).
"""
from __future__ import annotations

import math
import os
import re
import signal
import sys
import threading
import time
from typing import Optional

from hybrid.errors import ConfigError, UserError

from .distributed import HostGroup

PREEMPTED = 75  # EX_TEMPFAIL: the run stopped on request and can be continued
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class Preempted(Exception):
    """The run stopped on a signal or its wall-time limit after saving `checkpoint` at `step`."""

    def __init__(self, reason: str, step: int, checkpoint: Optional[str]):
        super().__init__(f"stopped by {reason} after step {step}; checkpoint {checkpoint}")
        self.reason, self.step, self.checkpoint = reason, step, checkpoint


class BadStepsError(UserError):
    """Too many non-finite steps in a row."""


def parse_duration(value) -> Optional[float]:
    """Seconds from `train.max_wall_time`: a number of seconds, or [D-]HH:MM:SS / MM:SS as SLURM writes times.
    None or '' means no limit."""
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)", text)
    try:
        seconds = float(text) if m is None else \
            ((int(m.group(1) or 0) * 24 + int(m.group(2) or 0)) * 60 + int(m.group(3))) * 60 + float(m.group(4))
    except ValueError:
        raise ConfigError(f"train.max_wall_time={text!r}: expected seconds (5400) or [D-]HH:MM:SS (1:30:00)") from None
    if not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"train.max_wall_time={text!r}: must be a positive, finite time")
    return seconds


class StopRequests:
    """Signal handlers and the wall-time clock of one run; `requested()` after each step says whether (and why)
    every rank stops now."""

    def __init__(self, max_wall_time: Optional[float] = None, ranks: Optional[HostGroup] = None):
        self.limit, self.ranks = max_wall_time, ranks or HostGroup()
        self.t0 = time.monotonic()
        self.reason: Optional[str] = None
        self._previous: dict = {}

    def install(self) -> "StopRequests":
        """Take over SIGTERM / SIGUSR1 / SIGINT (main thread only: Python delivers signals there)."""
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None:  # the second request: no more waiting
            sys.stderr.write(f"\n{name} again: exiting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.reason = name
        sys.stderr.write(f"\n{name}: finishing this step, then saving a checkpoint and exiting "
                         f"(send it again to exit at once)\n")
        sys.stderr.flush()

    def requested(self) -> Optional[str]:
        """Why every rank stops after this step, or None. Collective when there are several ranks."""
        local = self.reason
        if local is None and self.limit is not None and time.monotonic() - self.t0 >= self.limit:
            local = f"train.max_wall_time ({self.limit:g} s)"
        if self.ranks.any(local is not None) and local is None:
            local = "a stop request on another rank"
        return local


class Spike(Exception):
    """A step's loss far above the running mean (raised after every value of the read was recorded)."""

    def __init__(self, step: int, loss: float, mean: float):
        super().__init__(f"loss spike at step {step}: {loss:.3f} against a running mean of {mean:.3f}")
        self.step, self.loss, self.mean = step, loss, mean


class LossSpikes:
    """`train.spike_factor`: a finite loss above factor x the running mean (an exponential average over about
    50 steps, armed after WARMUP steps) is a spike. 0 turns the check off."""
    WARMUP = 20

    def __init__(self, factor: float):
        self.factor, self.mean, self.seen = factor, None, 0

    def check(self, step: int, loss: float) -> Optional[Spike]:
        if not self.factor or not math.isfinite(loss):
            return None
        if self.seen >= self.WARMUP and loss > self.factor * self.mean:
            return Spike(step, loss, self.mean)  # not folded into the mean: the run goes back before it
        self.mean = loss if self.mean is None else 0.98 * self.mean + 0.02 * loss
        self.seen += 1
        return None


class BadSteps:
    """Counts steps whose loss or gradient norm is not finite, from the values the loop reads."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.total, self.in_a_row, self.first_of_run = 0, 0, None

    def record(self, step: int, loss: float, gnorm: float, checkpoint: Optional[str]) -> bool:
        """True when `step` was bad (its update skipped); raises BadStepsError at max_in_a_row in a row."""
        if math.isfinite(loss) and math.isfinite(gnorm):
            self.in_a_row, self.first_of_run = 0, None
            return False
        self.total += 1
        self.in_a_row += 1
        self.first_of_run = step if self.first_of_run is None else self.first_of_run
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            raise BadStepsError(
                f"{self.in_a_row} steps in a row ({self.first_of_run}-{step}) had a non-finite loss or gradient "
                f"norm (train.max_bad_steps={self.max_in_a_row}); their updates were skipped, so the last "
                f"checkpoint ({checkpoint or 'none saved yet'}) is intact. Lower train.lr or look at the data of "
                "these steps, then rerun to resume from it")
        return True
