"""The ``bitsandbytes.optim.optimizer`` import path: the optimizer bases and the manager."""

from kbit.optim import GlobalOptimManager, Optimizer1State, Optimizer2State, Optimizer8bit

__all__ = ["GlobalOptimManager", "Optimizer1State", "Optimizer2State", "Optimizer8bit"]
