"""`config.profile_steps`: a `jax.profiler` trace of a few train steps, for TensorBoard's profile
plugin or XProf (`pip install xprof`, then `xprof --logdir=WORKDIR/profile`, or
`tensorboard --logdir=WORKDIR/profile` with `tensorboard-plugin-profile`).

Process 0 traces steps [start, start + count) (step numbers as the progress line counts them,
1-based) into `WORKDIR/profile/plugins/profile/<run>/*.xplane.pb`; each step is annotated as a
step so the viewer's step-time breakdown works. The trace waits for its last step to finish, so
the device work of every traced step is in it. The profiler writes through TensorFlow's file
system (TSL): a gs:// workdir works on Cloud machines with credentials, not with an emulator.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import jax

from swiftformer_jax import paths
from swiftformer_jax.logs import log

PROFILE_DIR = "profile"


def check(profile_steps: Sequence[int]) -> tuple[int, int]:
    """(start, count) from `config.profile_steps`; ValueError naming what is wrong."""
    values = tuple(profile_steps)
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"must be (start step, step count), got {profile_steps!r}")
    start, count = values
    if count < 0 or (count and start < 1):
        raise ValueError(f"must be (start >= 1, count >= 0) (count 0: no profile), got {profile_steps!r}")
    return start, count


class StepProfiler:
    """Starts the trace before step `start` and stops it once step `start + count - 1` is done."""

    def __init__(self, workdir: str, profile_steps: Sequence[int], enabled: bool | None = None):
        self.start, self.count = check(profile_steps)
        self.enabled = self.count > 0 and (jax.process_index() == 0 if enabled is None else enabled)
        self.directory = str(paths.path(workdir) / PROFILE_DIR)
        self._tracing = False

    def _in_window(self, step: int) -> bool:
        return self.enabled and self.start <= step < self.start + self.count

    @contextlib.contextmanager
    def step(self, step: int, result: list):
        """Around the call of 1-based `step`; `result` receives what the step returns (its state is
        waited for when the trace ends)."""
        if not self._in_window(step):
            yield
            return
        if not self._tracing:
            jax.profiler.start_trace(self.directory)
            self._tracing = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield
        if step == self.start + self.count - 1:
            self._stop(result)
            log.info("Profile of steps %d-%d written to %s.", self.start, step, self.directory)

    def _stop(self, result: Any) -> None:
        jax.block_until_ready(result)
        jax.profiler.stop_trace()
        self._tracing = False

    def close(self) -> None:
        """Stop a trace the run ended inside of (a stop or the end before the window closed)."""
        if self._tracing:
            self._stop(None)
            log.info("Profile (cut short at the end of the run) written to %s.", self.directory)
