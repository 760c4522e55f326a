"""How many requests an in-process vLLM engine runs at once: for benchmarks and tests of the
capacity the freed blocks buy (needs VLLM_ENABLE_V1_MULTIPROCESSING=0, so that the scheduler
lives in this process)."""
from __future__ import annotations


class RunningPeak:
    """Records, after every scheduling step of `llm`, the most requests running at once."""

    def __init__(self, llm):
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        schedule = scheduler.schedule
        self.peak = 0

        def counting_schedule(*args, **kwargs):
            out = schedule(*args, **kwargs)
            self.peak = max(self.peak, len(scheduler.running))
            return out

        scheduler.schedule = counting_schedule
