"""Peak memory of one training step: the most bytes allocated at any moment during the step, above
what was allocated before it.

On CUDA this is ``max_memory_allocated``. On CPU torch keeps no such counter, so the same quantity is
read from ``torch.profiler``'s memory timeline, which records every allocation and free of the step.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch


def peak_step_bytes(step: Callable[[], None], device: str) -> int:
    """Peak bytes allocated during ``step()`` above what was allocated before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak
