"""The ``"params"`` of a DeepSpeed config's optimizer entry: the keys each of our types takes, and the values checked.

The builders of our types (``gradpower_ds.deepspeed`` for ``"AdamPower"``/``"AdamWPower"``,
``gradpower_ds.deepspeed.muon_power`` for ``"MuonPower"``) split a config's params here, and the
main job checks the DeepSpeed config it generates here before it launches, so an unknown key,
an old name of p (``hyperparams.RENAMED``) and a bad value are refused the same way for every
type, with the names of ``hyperparams.POWER_NAMES``.
"""

from __future__ import annotations

from ..hyperparams import ADAM_POWER_DEFAULTS, POWER_NAMES, RENAMED, check_settings, power_names

ADAM_POWER_PARAMS = (*ADAM_POWER_DEFAULTS, *(name for name in power_names("adampower", "deepspeed")
                                            if name not in ADAM_POWER_DEFAULTS), "fused", "resume_changes")
"""The params "AdamPower" and "AdamWPower" take: AdamPower's hyperparameters, expert_power, fused, resume_changes (what
engine.load_checkpoint does with a changed setting, ``hyperparams.RESUME_CHANGES``)."""
MUON_KEYS = ("lr", "muon_lr", "adam_lr", "momentum", "weight_decay", "ns_method", "betas", "eps", "adam_w_mode",
             "per_head_muon")
"""The params DeepSpeed's Muon reads (0.19.8); DeepSpeed drops any other key without a word, MuonPower refuses it."""
MUON_POWER_PARAMS = (*MUON_KEYS, *power_names("muonpower", "deepspeed"), "resume_changes")
"""The params "MuonPower" takes: DeepSpeed Muon's, power, adam_power and resume_changes."""
OUR_TYPES = {"adampower": ("AdamPower", "adampower", ADAM_POWER_PARAMS),
             "adamwpower": ("AdamWPower", "adampower", ADAM_POWER_PARAMS),
             "muonpower": ("MuonPower", "muonpower", MUON_POWER_PARAMS)}
"""Our optimizer types (lower-cased, as DeepSpeed's config holds them) -> (name, the optimizer that steps, params)."""


def split_params(optimizer_type: str, params: dict | None) -> tuple[dict, dict[str, float]]:
    """Splits the ``params`` of a config's optimizer entry of `optimizer_type` into (the other params, checked, {name
    of p: value}), the p settings validated and their defaults filled in (``hyperparams.check_settings``).

    For our types an unknown key is refused (an old name of p says what replaced it); DeepSpeed's own types (AdamW,
    Muon, ...) take any key, and only AdamPower's hyperparameters among them (lr, betas, eps, weight_decay) are
    checked. ValueError or TypeError naming the type and the key.
    """
    name, optimizer, accepted = OUR_TYPES.get(optimizer_type.lower(), (optimizer_type, optimizer_type.lower(), None))
    owner = f"DeepSpeed optimizer {name!r} params"
    values = dict(params or {})
    unknown = [] if accepted is None else sorted(set(values) - set(accepted))
    if unknown:
        raise ValueError(f"{owner}: unknown key(s) {unknown}; accepted keys are {list(accepted)}"
                         + "".join(f"; {RENAMED[key]}" for key in unknown if key in RENAMED))
    checked = check_settings(values, optimizer, "deepspeed", owner=owner)
    powers = {key: checked.pop(key) for key in POWER_NAMES if key in checked}
    return checked, powers
