"""Fixes for megatron-core's DistributedOptimizer checkpoints with torch's Adam (no TransformerEngine/apex).

Without TE or apex, megatron-core (``megatron_patches.SUPPORTED_MEGATRON_CORE``) runs torch's
AdamW inside its DistributedOptimizer, and two of its checkpoint paths then go wrong:

1. ``state_dict()`` asserts that the torch optimizer's state holds one common ``step``; a freshly
   built optimizer has no state, so building the state dict to *load into*
   (``sharded_state_dict(..., is_loading=True)``, what every resume does) fails. The wrapper first
   gives each empty param state what torch's Adam creates on its first step (step 0, zero moments);
   loading overwrites all of it.
2. ``load_state_dict()`` puts one and the same ``step`` tensor into every param's state, and then
   its ``dp_reshardable`` parameter-state load copies the per-param ``step`` of the state dict it
   loaded into (the placeholder of fix 1, 0) over it. torch's Adam increments each param's step in
   place, so a shared tensor would also advance once per parameter per step; either way the bias
   correction after a resume is wrong and the resumed run silently differs from the uninterrupted
   one. The wrapper sets every param's step, as its own tensor, to the step the checkpoint's param
   groups hold (what Megatron saved from torch's state).

3. (megatron-core before 0.15.0) its parameter-state loads copy every key of a torch Adam param
   state from the checkpoint's tensors, which never hold ``step`` (``KeyError: 'step'``, with or
   without fix 1: its ``load_state_dict`` puts a step into every state first). The wrapper of
   ``_set_main_param_and_optimizer_states`` copies the others and leaves the step to fix 2.

The wrappers do nothing when TE or apex provides the Adam (then Megatron keeps the step in the param
groups). They matter to any optimizer Megatron builds this way, Adam and AdamPower alike; they are
installed by ``megatron_patches.apply()`` (listed in ``megatron_patches.patches``) and removed by
``remove()``.
"""

from __future__ import annotations

import functools

import torch


def _torch_adam(distributed_optimizer):
    """The torch Adam(W) inside a DistributedOptimizer when Megatron fell back to it, else None."""
    from megatron.core.optimizer import distrib_optimizer

    inner = getattr(distributed_optimizer, "optimizer", None)
    if distrib_optimizer.HAVE_APEX_OR_TE or not isinstance(inner, torch.optim.Adam):  # AdamW subclasses Adam
        return None
    return inner


def state_dict_with_initial_state(original):
    """DistributedOptimizer.state_dict that first gives each empty torch Adam param state its initial state (fix 1)."""

    @functools.wraps(original)
    def state_dict(self):
        inner = _torch_adam(self)
        if inner is not None:
            for group in inner.param_groups:
                for param in group["params"]:
                    if not inner.state[param]:
                        inner.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                                  exp_avg_sq=torch.zeros_like(param))
        return original(self)

    return state_dict


def load_state_dict_with_own_steps(original):
    """DistributedOptimizer.load_state_dict that then gives every param its own step tensor, holding the checkpoint's
    step (fix 2)."""

    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        inner = _torch_adam(self)
        steps = {group.get("step") for group in state_dict.get("optimizer", {}).get("param_groups", [])} - {None}
        if inner is not None and len(steps) == 1:
            step = float(steps.pop())
            for state in inner.state.values():
                state["step"] = torch.tensor(step)  # one tensor per param, holding the checkpoint's step
        return result

    return load_state_dict


def set_param_state_keeping_step(original):
    """DistributedOptimizer._set_main_param_and_optimizer_states that leaves a torch Adam param's step alone when
    the loaded tensors hold none (fix 3, megatron-core before 0.15.0)."""

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        inner = _torch_adam(self)
        if inner is None or "step" in tensors:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = inner.state[inner.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    return set_states
