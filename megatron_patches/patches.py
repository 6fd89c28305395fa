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
    """The patches, in the order apply() makes them, each with the megatron-core versions it applies to."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import optimizer as mcore_optimizer_module
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer import optimizer_config
    from megatron.core.optimizer.optimizer_config import OptimizerConfig

    from . import arguments, blockwise, checkpoint, optimizer

    try:
        megatron_lm = arguments.megatron_lm_patches()
    except LookupError as exc:
        raise UnsupportedMegatronError(str(exc)) from exc
    # AdamOptimizerConfig, the subclass Megatron-LM builds for "adam": 0.16 and 0.17 (0.18 on: OptimizerConfig)
    adam_config = getattr(optimizer_config, "AdamOptimizerConfig", OptimizerConfig)
    return [
        # all versions: OptimizerConfig(optimizer="adampower" | "muonpower" | "dist_muonpower", gradpower_p=...,
        # gradpower_blockwise_lr=...), validated as Megatron validates what ours steps as ('adam', Muon)
        *(Add(OptimizerConfig, name, default) for name, default in optimizer.CONFIG_FIELDS.items()),
        Wrap(OptimizerConfig, "__init__", optimizer.config_init),
        *([] if adam_config is OptimizerConfig else [Wrap(adam_config, "__init__", optimizer.config_init)]),
        Wrap(OptimizerConfig, "__post_init__", optimizer.config_post_init),
        # all versions: get_megatron_optimizer builds ours as what it steps as (0.18 on routes other names to its
        # emerging optimizers), with the blockwise lrs in its config_overrides; the inner builds get AdamPower's step
        Wrap(mcore_optimizer, "get_megatron_optimizer", optimizer.build_optimizer_with_power),
        Wrap(mcore_optimizer, "_get_megatron_optimizer_based_on_param_groups", optimizer.build_with_power),
        # 0.18 on: our names on its emerging-optimizer path (a get_megatron_optimizer imported before apply()) refused
        *([Wrap(mcore_optimizer, "_get_megatron_emerging_optimizer", optimizer.refuse_ours_on_the_emerging_path)]
          if hasattr(mcore_optimizer, "_get_megatron_emerging_optimizer") else []),
        # 0.16 on (config overrides): blockwise lrs, each block's max_lr/min_lr as config overrides, per-row lrs for
        # linear_qkv (internal functions every build goes through, wherever get_megatron_optimizer was imported)
        Wrap(mcore_optimizer, "_get_param_groups", blockwise.param_groups_with_blockwise),
        Wrap(mcore_optimizer, "_get_megatron_optimizer_based_on_param_groups", blockwise.build_with_row_lrs),
        # 0.16 and 0.17: get_megatron_muon_optimizer builds MuonPower for muonpower / dist_muonpower (0.18 on it
        # forwards to get_megatron_optimizer, which builds Muon itself)
        *([Wrap(optimizer.muon_module(), "get_megatron_muon_optimizer", optimizer.build_muon_with_power)]
          if optimizer.muon_builds_muon() else []),
        # all versions: Megatron's clip coefficient folded into our fused inner optimizers' steps (the name its
        # optimizers call, in megatron.core.optimizer.optimizer)
        Wrap(mcore_optimizer_module, "clip_grad_by_total_norm_fp32", optimizer.clip_grads_folded),
        # all versions: the DistributedOptimizer's checkpoints with torch's Adam (no TE/apex)
        Wrap(DistributedOptimizer, "state_dict", checkpoint.state_dict_with_initial_state),
        Wrap(DistributedOptimizer, "load_state_dict", checkpoint.load_state_dict_with_own_steps),
        # before 0.15
        *([] if MEGATRON_CORE.installed_at_least(DP_RESHARDABLE_FROM) else
          [Wrap(DistributedOptimizer, "_set_main_param_and_optimizer_states",
                checkpoint.set_param_state_keeping_step)]),
        # Megatron-LM, where importable: --optimizer adampower/muonpower/dist_muonpower, its optimizer config and
        # builders, its argument checks (each with its versions: arguments.megatron_lm_patches)
        *megatron_lm,
        # 0.13 through 0.16: megatron-core's MoE router names te_general_gemm, defined only when TE imports: without
        # TE every MoE forward fails with NameError. None is the no-TE path its code checks for (0.17 on defines it).
        *([] if hasattr(moe_utils, "te_general_gemm") else [Add(moe_utils, "te_general_gemm", None)]),
    ]


PATCHES = PatchSet("megatron_patches", MEGATRON_CORE, "it patches its optimizer construction", _patches,
                   UnsupportedMegatronError)
