"""Whether a model does a task well enough for its patching ground truth to mean anything;
shared by `discover` and `recovery` (which `discover` imports)."""

from __future__ import annotations

import warnings

import torch

from saelab.errors import SaelabWarning
from saelab.models import HookedModel
from saelab.tasks import TaskTokens, correct, last_logits

# Below this share of its own prompts done right (answer token above every wrong one), a task's
# patching ground truth measures heads' effects on a behaviour the model mostly lacks: on
# zoo:tasks-4l's induction (0.675) no head moved the metric by more than 0.07 and the circuit
# lost two heads on another prompt seed. 0.8 (a wrong answer on at most one prompt in five)
# sits between chance for IOI's two names (0.5) and the 0.95 the zoo's task models are held to.
ACCURACY_FLOOR = 0.8


@torch.no_grad()
def warn_if_inaccurate(model: HookedModel, name: str, tokens: TaskTokens) -> float:
    """The model's accuracy on `tokens` (a task's own prompts), with a one-line SaelabWarning
    when it is below ACCURACY_FLOOR: that task's ground truth would be noise."""
    last = last_logits(model.logits(tokens.pos.to(model.device)), tokens.pos_len).cpu()
    acc = correct(last, tokens).float().mean().item()
    if acc < ACCURACY_FLOOR:
        warnings.warn(f"{model.spec} does task {name} right on only {acc:.0%} of {len(last)} of "
                      f"its prompts (floor {ACCURACY_FLOOR:.0%}): its patching ground truth "
                      "would be noise, not a circuit", SaelabWarning, stacklevel=2)
    return acc
