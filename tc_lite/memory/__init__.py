"""GPU memory of a training step, known before the run: the estimator (`estimate_memory`, fake tensors on the CPU,
no weights) and the planner (`plan_memory`, `memory.plan: auto`). See docs/memory.md."""

from tc_lite.memory.estimate import GiB, MemoryEstimate, estimate_memory
from tc_lite.memory.plan import MemoryPlan, plan_memory

__all__ = ["GiB", "MemoryEstimate", "MemoryPlan", "estimate_memory", "plan_memory"]
