"""Everything ``megatron_patches.apply()`` changes in megatron-core (and Megatron-LM), in one list.

``PATCHES`` is a ``gradpower_ds.patching.PatchSet``: a megatron-core outside
``SUPPORTED_MEGATRON_CORE`` (the tested range) is refused with ``UnsupportedMegatronError``
naming it. Where an internal differs between supported versions, the list holds one adapter
for it with the version named beside it. Every patch is undone by ``remove()``. What each
patch does is documented where its wrapper lives: ``megatron_patches.optimizer``
(AdamPower, MuonPower), ``megatron_patches.blockwise`` (blockwise lrs),
``megatron_patches.checkpoint`` (the DistributedOptimizer's checkpoints with
torch's Adam), ``megatron_patches.arguments`` (Megatron-LM's ``--optimizer`` and optimizer
config, only where Megatron-LM is importable).
"""

from __future__ import annotations

import importlib

from gradpower_ds.patching import Add, Package, PatchSet, UnsupportedVersionError, Wrap
from gradpower_ds.versions import TESTED

MEGATRON_CORE = Package("megatron-core", "megatron.core", "megatron-core", *TESTED["megatron-core"])
SUPPORTED_MEGATRON_CORE = MEGATRON_CORE.supported
# megatron-core 0.15.0 brought the "dp_reshardable" optimizer format, whose parameter-state load copies the step
# from the loaded state; before it train_megatron saves "fully_sharded_model_space" and checkpoint fix 3 applies
DP_RESHARDABLE_FROM = "0.15.0"


class UnsupportedMegatronError(UnsupportedVersionError):
    """The installed megatron-core is not the version these patches were written and tested for."""


def _patches() -> list:
    """The patches, in the order apply() makes them."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer import optimizer_config
    from megatron.core.optimizer.optimizer_config import OptimizerConfig

    from . import arguments, blockwise, checkpoint, optimizer

    try:
        mcore_muon = importlib.import_module(optimizer.MUON_MODULE)  # megatron-core 0.16 on
    except ImportError:
        mcore_muon = None

    try:
        megatron_lm = arguments.megatron_lm_patches()
    except LookupError as exc:
        raise UnsupportedMegatronError(str(exc)) from exc

    # AdamOptimizerConfig, the subclass Megatron-LM builds for "adam": megatron-core 0.16.0 on
    adam_config = getattr(optimizer_config, "AdamOptimizerConfig", OptimizerConfig)
    return [
        # OptimizerConfig(optimizer="adampower" | "muonpower", gradpower_p=..., gradpower_blockwise_lr=..., ...)
        *(Add(OptimizerConfig, name, default) for name, default in optimizer.CONFIG_FIELDS.items()),
        Wrap(OptimizerConfig, "__init__", optimizer.config_init),
        *([] if adam_config is OptimizerConfig else [Wrap(adam_config, "__init__", optimizer.config_init)]),
        Wrap(OptimizerConfig, "__post_init__", optimizer.config_post_init),
        # get_megatron_optimizer builds AdamPower for it, per chained optimizer (dense, expert)
        Wrap(mcore_optimizer, "_get_megatron_optimizer_based_on_param_groups", optimizer.build_with_power),
        # blockwise lrs: each block's max_lr/min_lr as config overrides, per-row lrs for linear_qkv
        Wrap(mcore_optimizer, "_get_param_groups", blockwise.param_groups_with_blockwise),
        Wrap(mcore_optimizer, "_get_megatron_optimizer_based_on_param_groups", blockwise.build_with_row_lrs),
        # get_megatron_muon_optimizer builds MuonPower for "muonpower", where megatron-core has Muon
        *([] if mcore_muon is None else
          [Wrap(mcore_muon, "get_megatron_muon_optimizer", optimizer.build_muon_with_power)]),
        # the DistributedOptimizer's checkpoints with torch's Adam (no TE/apex)
        Wrap(DistributedOptimizer, "state_dict", checkpoint.state_dict_with_initial_state),
        Wrap(DistributedOptimizer, "load_state_dict", checkpoint.load_state_dict_with_own_steps),
        *([] if MEGATRON_CORE.installed_at_least(DP_RESHARDABLE_FROM) else
          [Wrap(DistributedOptimizer, "_set_main_param_and_optimizer_states", checkpoint.set_param_state_keeping_step)]),
        # Megatron-LM, where importable: --optimizer adampower/muonpower and their optimizer config
        *megatron_lm,
        # megatron-core's MoE router (0.13.0 through 0.16.1) names te_general_gemm, defined only when TE imports:
        # without TE every MoE forward fails with NameError. None is the no-TE path its code checks for.
        *([] if hasattr(moe_utils, "te_general_gemm") else [Add(moe_utils, "te_general_gemm", None)]),
    ]


PATCHES = PatchSet("megatron_patches", MEGATRON_CORE, "it patches its optimizer construction", _patches,
                   UnsupportedMegatronError)
