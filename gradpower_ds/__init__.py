"""gradpower-ds: GradPower/AdamPower and GPAS for DeepSpeed and Megatron-core.

Importing this package patches nothing; integrations are opt-in
(`gradpower_ds.deepspeed.register()`, `megatron_patches.apply()`).
"""

from .adam_power import AdamPower
from .power import grad_power, grad_power_, grad_power_foreach

__version__ = "0.1.0"

__all__ = ["AdamPower", "grad_power", "grad_power_", "grad_power_foreach", "__version__"]
