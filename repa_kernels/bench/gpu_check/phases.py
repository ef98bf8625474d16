"""Running one phase of the GPU check: its time budget, its outcome, and why a failure stays local.

A phase gets a budget in seconds. Its own loops check `Budget.left()` and stop early (cooperative);
a SIGALRM set a little past the budget interrupts a phase whose Python code overruns it (a single
long CUDA call cannot be interrupted, only the Python around it). Any exception, the alarm's too,
ends that phase alone: its result records the error and the run goes on to the next phase, so the
files of the phases that did finish are always written.
"""

from __future__ import annotations

import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

# In the order they run: the sweep before the workloads, which launch with its chosen configurations.
PHASES = ("install", "tests", "correctness", "peaks", "sweep", "workloads", "e2e")
DEFAULT_PHASES = PHASES[:-1]  # e2e only with --e2e

# The alarm fires this long after the cooperative budget, so a phase that checks its budget stops
# by itself first and keeps its partial results.
HARD_STOP_GRACE_S = 15.0


class PhaseTimeout(Exception):
    """Raised in a phase whose Python code outran its budget plus the grace."""


@dataclass
class Budget:
    seconds: float
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def share(self, parts_left: int) -> float:
        """An even share of what is left among `parts_left` parts (so one slow part cannot starve the rest)."""
        return max(0.0, self.left()) / max(1, parts_left)


@dataclass
class PhaseResult:
    name: str
    status: str = "ok"  # ok | partial (budget ran out) | failed | skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    lines: list[str] = field(default_factory=list)  # the phase's lines of the final summary
    error: str = ""


def run_phase(name: str, budget_s: float, body: Callable[[Budget, PhaseResult], None], log) -> PhaseResult:
    """Run `body(budget, result)`; whatever it raises is recorded in the result, never propagated."""
    result = PhaseResult(name, budget_s=budget_s)
    budget = Budget(budget_s)
    log(f"==== phase {name}: budget {budget_s:.0f} s")

    def on_alarm(signum, frame):
        raise PhaseTimeout(f"phase {name} overran its budget of {budget_s:.0f} s (+{HARD_STOP_GRACE_S:.0f} s grace)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget_s + HARD_STOP_GRACE_S)
    try:
        body(budget, result)
    except BaseException as exc:  # noqa: BLE001 - one phase's failure must not lose the others'
        if isinstance(exc, KeyboardInterrupt):
            raise
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        log(traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    result.seconds = budget.elapsed()
    log(f"==== phase {name}: {result.status} in {result.seconds:.1f} s{' - ' + result.error if result.error else ''}")
    return result
