"""Built-in tasks with programmatic judges, looked up by name (`eval.judge: demo`).

A task is a module-like object with:
    make_sft_rows(n, seed) -> [{"prompt", "completion"}]
    make_preference_rows(n, seed) -> [{"prompt", "chosen", "rejected"}]
    make_eval_prompts(n, seed) -> [{"prompt", ...fields its judges need}]
    skill_correct(prompt_row, completion) -> bool
    style_score(completion) -> float in [0, 1] (1 = preferred style)
    judge_pair(prompt_row, completion_a, completion_b) -> 1 | 0 | -1 (a wins / tie / b wins)
"""

from __future__ import annotations

from types import ModuleType

from jaxalign.errors import JaxalignError
from jaxalign.eval.tasks import demo

TASKS: dict[str, ModuleType] = {demo.NAME: demo}


def get_task(name: str) -> ModuleType:
    """The task registered under `name`; raises JaxalignError naming the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise JaxalignError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
