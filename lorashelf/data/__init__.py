"""Tasks from BIG-bench JSON, JSONL files and Hugging Face datasets, as examples.

``load_task("bigbench:sports_understanding", home=...)`` returns a :class:`Task`
whose examples carry the rendered prompt and the answer continuations;
``list_tasks`` reads the catalogues; ``pull_bigbench`` fetches BIG-bench once.
``SOURCES`` lists the ``bigbench``, ``jsonl`` and ``hf`` sources (imported on first use).
"""

from lorashelf.data.bigbench_pull import pull_bigbench
from lorashelf.data.sources import SOURCES, TaskInfo, list_tasks, load_task
from lorashelf.data.task import Example, Splits, Task

__all__ = [
    "SOURCES",
    "Example",
    "Splits",
    "Task",
    "TaskInfo",
    "list_tasks",
    "load_task",
    "pull_bigbench",
]
