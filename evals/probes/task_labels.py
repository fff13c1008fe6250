"""Labels for the task model (word tokenizer, `zoo:tasks-4l-v2`) from the circuit-task generators.

The generators know each prompt's roles, so labels are exact and cost nothing: in IOI prompts,
the indirect object's name and the subject's name (both of its mentions), and IO against S
among the names; in greater-than prompts, the start year's last two digits; in docstring
prompts, the def's argument names and the names after `:param`. A label's negatives are the
other positions of its task's prompts (`Label.scope`); a prompt is a unit of the train/test
split, as a file is for Python labels.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from saelab import tasks
from saelab.evals.probes.labels import NONE, Label

TASKS = ("ioi", "greater-than", "docstring")
ROLES = ("IO", "S", "year", "def arg", "param")  # per position: its role in its prompt, or NONE
FAMILY = "task"


def _role(*roles: str) -> Callable[[torch.Tensor], torch.Tensor]:
    ids = torch.tensor([ROLES.index(r) for r in roles])
    return lambda f: torch.isin(f[:, 1], ids)


def _task(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda f: f[:, 0] == TASKS.index(name)


TASK_LABELS: tuple[Label, ...] = (
    Label("ioi:IO name", FAMILY, _role("IO"), _task("ioi")),
    Label("ioi:S name", FAMILY, _role("S"), _task("ioi")),
    Label("ioi:IO not S", FAMILY, _role("IO"), _role("IO", "S")),
    Label("greater-than:start yy", FAMILY, _role("year"), _task("greater-than")),
    Label("docstring:def arg", FAMILY, _role("def arg"), _task("docstring")),
    Label("docstring:param name", FAMILY, _role("param"), _task("docstring")),
)


def _spans(name: str, task: tasks.Task, i: int) -> list[tuple[int, int, int]]:
    """(start, end, role) character spans of prompt `i` of `task`."""
    text = task.prompts[i]
    if name == "ioi":
        io, s = task.answers[i][0].strip(), task.wrongs[i][0].strip()
        return [(m.start(), m.end(), ROLES.index(role)) for role, who in (("IO", io), ("S", s))
                for m in re.finditer(rf"\b{re.escape(who)}\b", text)]
    if name == "greater-than":
        return [(m.start(1), m.end(1), ROLES.index("year"))
                for m in re.finditer(r"from the year \d\d(\d\d)", text)]
    head = re.match(r"def \w+\(self, ([^)]*)\)", text)
    args = [(head.start(1) + m.start(), head.start(1) + m.end(), ROLES.index("def arg"))
            for m in re.finditer(r"\w+", head[1])] if head else []
    return (args + [(m.start(1), m.end(1), ROLES.index("param")) for m in re.finditer(r":param (\w+)", text)])


def prompts(n_per_task: int, seed: int) -> list[tuple[int, str, list[tuple[int, int, int]]]]:
    """(task index, prompt text, role spans) of `n_per_task` seeded prompts of each task."""
    out = []
    for t, name in enumerate(TASKS):
        task = tasks.generate(name, n_per_task, seed)
        out += [(t, task.prompts[i], _spans(name, task, i)) for i in range(len(task))]
    return out


def token_fields(task: int, text: str, spans: list[tuple[int, int, int]],
                 offsets: list[tuple[int, int]]) -> torch.Tensor:
    """(tokens, 2) fields: the task index, and the role whose span holds the token's first
    character (NONE if none; tokens with no characters get NONE for both)."""
    chars = torch.full((len(text),), NONE, dtype=torch.long)
    for a, b, role in spans:
        chars[a:b] = role
    return torch.tensor([[task, int(chars[a])] if b > a else [NONE, NONE] for a, b in offsets],
                        dtype=torch.long).reshape(-1, 2)
