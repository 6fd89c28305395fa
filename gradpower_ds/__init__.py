"""gradpower-ds: GradPower/AdamPower and GPAS for DeepSpeed and Megatron-core.

This package is the library: the optimizers, phi and its kernels, GPAS, blockwise groups,
noise metrics, hyperparameter rules and the patching mechanism. Its integrations are
``gradpower_ds.deepspeed`` and the top-level ``megatron_patches``; the jobs (the main
job, compare, the demo model) are ``gradpower_ds.jobs``, which the library never imports.
Importing this package patches nothing; integrations are opt-in
(``gradpower_ds.deepspeed.register()``, ``megatron_patches.apply()``).
"""

from .adam_power import AdamPower
from .blockwise import blockwise_param_groups
from .cpu_adam_power import CPUAdamPower
from .gpas import (GPASGate, apply_gpas, clip_gate_grad_norm_, gpas_scale, param_groups_with_gpas,
                   register_gate_grad_clip, remove_gpas)
from .functional import adam_power
from .power import grad_power, grad_power_

from .versions import VERSION as __version__

__all__ = [
    "AdamPower", "CPUAdamPower", "GPASGate", "adam_power", "apply_gpas", "blockwise_param_groups",
    "clip_gate_grad_norm_", "gpas_scale",
    "grad_power",
    "grad_power_", "param_groups_with_gpas", "register_gate_grad_clip", "remove_gpas", "__version__",
]
