"""The numerics a planner thinks in: torch in float64 on one intra-op thread, whatever the process's settings.

Kept apart from the models so that a planner without one (the Sobol and random baselines) does not import BoTorch
and GPyTorch: importing the baselines took 2.0-2.2 s of CPU here instead of 2.5-2.6 s, at every start of a daemon
or `closedloop run` of a baseline campaign.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

_F = TypeVar("_F", bound=Callable[..., Any])

# torch's intra-op thread count inside in_planner_numerics: every decision of a planner whose suggest runs there is
# made on it, whatever the process's count (its class says so, ``torch_threads``, for the provenance record)
PLANNER_THREADS = 1


def in_planner_numerics(method: _F) -> _F:
    """Runs ``method`` with torch in float64 on one intra-op thread, then puts the caller's settings back.

    float64: some of BoTorch's optimizers make tensors in the default dtype, so a process whose default
    another library changed (Xopt sets float64 on import) got other proposals from the same data and seed
    (mixed4, seed 2: final log10 regret -2.59 alone, -2.56 after importing Xopt). With the dtype set here
    the planner gives the same proposals in every process, as replay and a restarted daemon need.

    One thread: a planner's matrices are small (at most ``models.MAX_TRAIN`` rows), and more threads only fight
    the station, the daemon and other processes for the cores. Hartmann6, median seconds per suggestion
    at 10 / 50 / 200 experiments on this 2-core machine: idle, 0.31 / 0.13 / 0.18 on one thread and
    0.36 / 0.15 / 0.22 on two; with one core busy elsewhere, 0.26 / 0.16 / 0.25 on one and 0.68 / 0.47 /
    0.59 on two (torch's default is a thread per core). At 1,000 experiments 0.29 s against 0.31 s.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _planner_numerics():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


_settings_lock = threading.Lock()
_users = 0
_dtype_before: torch.dtype = torch.float32
_threads_before = 1


@contextlib.contextmanager
def _planner_numerics() -> Iterator[None]:
    """float64 and one thread (both process-wide in torch) while any thread is inside; the caller's after the last.

    The default dtype is not per thread: a daemon's planner thread and its filler (the main thread) overlap,
    and each restoring the dtype it found made the other's Sobol points float32 now and then (the first
    point of torch's ``SobolEngine`` depends on the default dtype), so a filler proposal did not replay.
    """
    global _users, _dtype_before, _threads_before
    with _settings_lock:
        if _users == 0:
            _dtype_before, _threads_before = torch.get_default_dtype(), torch.get_num_threads()
            torch.set_default_dtype(torch.float64)
            torch.set_num_threads(PLANNER_THREADS)
        _users += 1
    try:
        yield
    finally:
        with _settings_lock:
            _users -= 1
            if _users == 0:
                torch.set_default_dtype(_dtype_before)
                torch.set_num_threads(_threads_before)
