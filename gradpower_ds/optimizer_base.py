"""AdamPowerBase: what every AdamPower optimizer class shares (hyperparameters, validation, state layout).

The optimizer classes (``gradpower_ds.AdamPower``, ``gradpower_ds.CPUAdamPower``)
subclass it; it steps through the functional core ``gradpower_ds.functional.adam_power``.
"""

from __future__ import annotations

import logging

import torch

from .folding import FoldsIntoStep
from .functional import adam_power
from .hyperparams import (ADAM_POWER_DEFAULTS, RESUME_CHANGES_DEFAULT, RESUME_COMPARED, check_resume_changes,
                          check_settings, resume_changes_between)

_log = logging.getLogger(__name__)


def check_resume(owner: str, resume_changes: str, saved_groups: list[dict], own_groups: list[dict],
                 keys: tuple[str, ...] = RESUME_COMPARED) -> dict[int, dict[str, tuple]]:
    """The resume policy (``hyperparams.RESUME_POLICY``) before a checkpoint's param groups `saved_groups` are loaded
    into groups whose settings are `own_groups`: {group index: {setting: (saved, own)}} for each of `keys` that
    differs (``hyperparams.resume_changes_between``). Unless `resume_changes` is "apply", a change is refused before
    anything is loaded: ValueError naming each group, setting and both values, and the setting that accepts them.
    Groups that differ in number are the load's own error (torch's, or the caller's)."""
    changes = {i: changed for i, (saved, own) in enumerate(zip(saved_groups, own_groups))
               if (changed := resume_changes_between(saved, own, keys))} if len(saved_groups) == len(own_groups) else {}
    if changes and resume_changes != "apply":
        raise ValueError(f"{owner}: the checkpoint was saved with other settings: {_listed(changes)}. Pass "
                         f"resume_changes=\"apply\" (DeepSpeed config: \"params\": {{\"resume_changes\": \"apply\"}}) "
                         "to use this optimizer's values, or build it with the checkpoint's")
    return changes


def keep_own_settings(owner: str, groups: list[dict], own_groups: list[dict], changes: dict[int, dict]) -> None:
    """After a load under resume_changes "apply" (`changes` from ``check_resume``): each changed setting of the loaded
    `groups` set back to this run's (`own_groups`), with a warning naming each old -> new."""
    for i, changed in changes.items():
        groups[i].update({key: own_groups[i][key] for key in changed})
    if changes:
        _log.warning("%s: resume_changes=\"apply\": using this optimizer's settings, not the checkpoint's: %s", owner,
                     _listed(changes))


def _listed(changes: dict[int, dict]) -> str:
    return "; ".join(f"group {i}: {key} {old} (checkpoint) -> {new} (this optimizer)"
                     for i, changed in changes.items() for key, (old, new) in changed.items())


class AdamPowerBase(FoldsIntoStep, torch.optim.Optimizer):
    """What every AdamPower implementation shares: hyperparameters, their validation, the state layout.

    State keys are torch's AdamW ones (``step`` as a float32 tensor, ``exp_avg``,
    ``exp_avg_sq``), so checkpoints move between AdamPower, CPUAdamPower and
    torch.optim.AdamW. A wrapper may fold its grad scale and low-precision copy into the next step
    (``FoldsIntoStep``). ``resume_changes`` ("refuse" or "apply", ``hyperparams.RESUME_CHANGES``) is what
    load_state_dict does with a checkpoint saved with other settings (``hyperparams.RESUME_POLICY``).
    """

    def __init__(
        self,
        params,
        lr: float = ADAM_POWER_DEFAULTS["lr"],
        betas: tuple[float, float] = ADAM_POWER_DEFAULTS["betas"],
        eps: float = ADAM_POWER_DEFAULTS["eps"],
        weight_decay: float = ADAM_POWER_DEFAULTS["weight_decay"],
        adam_w_mode: bool = ADAM_POWER_DEFAULTS["adam_w_mode"],
        power: float = ADAM_POWER_DEFAULTS["power"],
        power_eps: float = ADAM_POWER_DEFAULTS["power_eps"],
        bias_correction: bool = ADAM_POWER_DEFAULTS["bias_correction"],
        resume_changes: str = RESUME_CHANGES_DEFAULT,
    ):
        self.resume_changes = check_resume_changes(resume_changes, owner=type(self).__name__)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode,
            power=power, power_eps=power_eps, bias_correction=bias_correction,
        )
        super().__init__(params, defaults)  # torch adds each group through add_param_group, which validates it

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group (see torch.optim.Optimizer) with its hyperparameters, the defaults filled in, validated; a
        rejected group is not kept. Every group enters here, those given at construction too."""
        super().add_param_group(param_group)
        try:
            self.param_groups[-1].update(check_settings(self.param_groups[-1], owner=type(self).__name__))
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def group_settings(self) -> list[dict]:
        """Each group's settings (those of the defaults' keys it has): what a resume compares with a checkpoint's
        groups (``check_resume``) and gives back under ``resume_changes="apply"`` (``keep_own_settings``)."""
        # a key of defaults that torch or DeepSpeed added later may be missing from a group (e.g. after a first load)
        return [{key: group[key] for key in self.defaults if key in group} for group in self.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, under the resume policy (``check_resume``): a saved group whose power, power_eps, betas, eps
        or weight_decay differs from this optimizer's is refused before anything is loaded, or with
        ``resume_changes="apply"`` loaded with this optimizer's values and a warning. lr is not compared: the lr
        scheduler's saved state sets it.

        A saved param group without AdamPower's settings (one of torch.optim.AdamW or DeepSpeed's "AdamW": no
        power, power_eps, adam_w_mode, bias_correction) gets them from this optimizer's own group, i.e. its
        constructor arguments, as torch's optimizers fill a missing default; a warning names what was filled.
        Every load but DeepSpeed's universal-checkpoint one enters here (ZeRO 1-3 and offload included); that one
        follows the same policy in ``gradpower_ds.deepspeed``."""
        owner, own = type(self).__name__, self.group_settings()
        changes = check_resume(owner, self.resume_changes, state_dict.get("param_groups", []), own)
        super().load_state_dict(state_dict)  # checks that the groups match in number and size
        keep_own_settings(owner, self.param_groups, own, changes)
        filled = {}
        for group, settings in zip(self.param_groups, own):
            for key, value in settings.items():
                if key not in group:
                    group[key] = value
                    filled.setdefault(key, value)
        if filled:
            _log.warning("%s: the loaded state dict has no %s (saved by another optimizer, e.g. torch.optim.AdamW): "
                         "using this optimizer's %s", owner, ", ".join(filled),
                         ", ".join(f"{key}={value}" for key, value in filled.items()))

    MOMENT_DTYPE: torch.dtype | None = None  # the moments' dtype; None: the param's (as torch's AdamW)

    def _init_states(self, params: list[torch.Tensor]) -> list[dict]:
        """Each param's state, created where missing: torch's AdamW layout. The step counters created together are
        the elements of one float32 tensor (each a 0-d view), so a kernel can advance them all with one add."""
        new = [p for p in params if not self.state[p]]
        for p, step in zip(new, torch.zeros(len(new), dtype=torch.float32).unbind()):
            self.state[p].update(
                step=step,
                exp_avg=torch.zeros_like(p, dtype=self.MOMENT_DTYPE, memory_format=torch.preserve_format),
                exp_avg_sq=torch.zeros_like(p, dtype=self.MOMENT_DTYPE, memory_format=torch.preserve_format))
        return [self.state[p] for p in params]

    def _step_group(self, group: dict, copies=None, copy_out: dict[int, torch.Tensor] | None = None,
                    grad_scale: float | torch.Tensor | None = None, **options) -> None:
        """Steps a param group's params that have a grad through the functional core (options: its keywords).

        copies: None or, per param of the group, None or a bf16/fp16 tensor receiving the new weights; copy_out
        ({id(param): tensor}, from FoldsIntoStep.fold_into_next_step) gives the others theirs; grad_scale multiplies the grads.
        """
        if copy_out:
            copies = [c if c is not None else copy_out.get(id(p))
                      for p, c in zip(group["params"], copies or [None] * len(group["params"]))]
        chosen = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        if not chosen:
            return
        params = [group["params"][i] for i in chosen]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        states = self._init_states(params)
        beta1, beta2 = group["betas"]
        adam_power(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                   [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr=group["lr"], beta1=beta1,
                   beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], power=group["power"],
                   power_eps=group["power_eps"], adam_w_mode=group["adam_w_mode"],
                   bias_correction=group["bias_correction"], grad_scale=grad_scale,
                   low_precision_params=None if copies is None else [copies[i] for i in chosen], **options)
