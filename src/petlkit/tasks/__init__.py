"""Tasks: data splits, what the model reads, and how a prediction is scored."""

from petlkit.tasks.base import Split, Task
from petlkit.tasks.registry import load_task, task_names

__all__ = ["Split", "Task", "load_task", "task_names"]
