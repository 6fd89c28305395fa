"""Launched job: a DeepSpeed checkpoint resumed with another power, under the resume policy (issue 35, item 4).

``ds_resume_policy.py ROOT OUT`` (2 ranks): for each ZeRO stage of STAGES, an AdamPower run (power SAVED_P)
trains SAVE_AT steps and saves under ROOT/z<stage> (tag "saved"), converted to a universal checkpoint too
("saved_universal", DeepSpeed 0.18.0 on). Then, for each way of loading it of LOADS (the checkpoint; the universal
one, where DeepSpeed has it), engines loading it: with power NEW_P (refused: the ValueError's message is kept),
with power NEW_P and ``"resume_changes": "apply"`` (its groups and the warning logged are kept) and with power
SAVED_P, the last two training on to STEPS. The same for MuonPower at each ZeRO stage of MUON_STAGES (DeepSpeed
0.19.8), with a changed Muon power and a changed adam_power. Rank 0 writes what each did to OUT, keyed
"z<stage> <load>" and "muon z<stage>".
"""

import logging
import sys

import deepspeed

from gradpower_ds import deepspeed as gds
from gradpower_ds.deepspeed import muon_power
from gradpower_ds.jobs.processes import exit_when_done

try:
    import ds_checkpoint, ds_muon, ds_toy  # launched: tests/jobs is sys.path[0]
except ImportError:  # imported by the tests as jobs.ds_resume_policy, for its settings
    from jobs import ds_checkpoint, ds_muon, ds_toy

STEPS, SAVE_AT = 3, 1
STAGES = (2, 3)
SAVED_P, NEW_P = 1.2, 1.5
LOADS = ("checkpoint", "universal") if ds_checkpoint.UNIVERSAL else ("checkpoint",)
MUON_STAGES = (0, 2, 3) if gds.DEEPSPEED.installed_at_least(muon_power.MUON_POWER_FROM) else ()
MUON_SAVED_P, MUON_NEW_P, MUON_ADAM_P = 1.5, 0.9, 1.2


class Kept(logging.Handler):
    """Keeps the messages logged to it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main() -> None:
    root, out = sys.argv[1], sys.argv[2]
    gds.register()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = deepspeed.comm.get_rank()
    kept = Kept()
    logging.getLogger("gradpower_ds.optimizer_base").addHandler(kept)
    results = {}
    for stage in STAGES:
        folder = f"{root}/z{stage}"
        saved = ds_toy.adam_power_engine(stage, power=SAVED_P)
        ds_toy.train(saved, rank, SAVE_AT)
        saved.save_checkpoint(folder, tag="saved")
        saved.destroy()
        if "universal" in LOADS:
            ds_checkpoint.to_universal([folder])
        for load in LOADS:
            results[f"z{stage} {load}"] = resume(stage, folder, load == "universal", rank, kept)
    for stage in MUON_STAGES:
        results[f"muon z{stage}"] = resume_muon(stage, f"{root}/muon_z{stage}", rank, kept)
    ds_toy.save_and_finish(results, out)


def resume(stage: int, folder: str, universal: bool, rank: int, kept: Kept) -> dict:
    """Engines loading the checkpoint in `folder` (its universal conversion where `universal`) with another power:
    refused, applied; and with the same one."""
    tag, res = "saved_universal" if universal else "saved", {}
    refused = ds_toy.adam_power_engine(stage, universal, power=NEW_P)
    try:
        refused.load_checkpoint(folder, tag=tag)
        res["refused"] = None
    except ValueError as error:
        res["refused"] = str(error)
    refused.destroy()
    for name, power, params in (("applied", NEW_P, {"resume_changes": "apply"}), ("same", SAVED_P, {})):
        del kept.messages[:]
        engine = ds_toy.adam_power_engine(stage, universal, power=power, **params)
        engine.load_checkpoint(folder, tag=tag)
        res[f"{name} groups"] = [g["power"] for g in engine.basic_optimizer.param_groups]
        res[f"{name} warnings"] = list(kept.messages)
        res[f"{name} losses"] = ds_toy.train(engine, rank, STEPS - SAVE_AT, first_step=SAVE_AT)
        res[name] = ds_toy.full_fp32_params(engine)
        engine.destroy()
    return res



def muon_engine(stage: int, power: float, adam_power: float = MUON_ADAM_P, **params):
    """A toy model's engine with MuonPower (ds_muon's settings, `power`, `adam_power` and `params`)."""
    config = ds_toy.ds_config(stage, opt_type="MuonPower", clip=0.0,
                              params=dict(ds_muon.MUON_PARAMS, power=power, adam_power=adam_power, **params))
    if stage == 3:
        config["zero_optimization"]["reduce_scatter"] = False  # DeepSpeed's ZeRO-3 Muon refuses reduce-scatter
    model = ds_toy.make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def resume_muon(stage: int, folder: str, rank: int, kept: Kept) -> dict:
    """A MuonPower checkpoint (power MUON_SAVED_P) loaded with power MUON_NEW_P (refused; applied), with adam_power
    1 (DeepSpeed's own auxiliary Adam: refused) and with its own settings."""
    res = {}
    saved = muon_engine(stage, MUON_SAVED_P)
    ds_toy.train(saved, rank, SAVE_AT)
    saved.save_checkpoint(folder, tag="saved")
    saved.destroy()
    for name, engine_args in (("refused", (MUON_NEW_P,)), ("refused adam", (MUON_SAVED_P, 1.0))):
        refused = muon_engine(stage, *engine_args)
        try:
            refused.load_checkpoint(folder, tag="saved")
            res[name] = None
        except ValueError as error:
            res[name] = str(error)
        refused.destroy()
    for name, power, params in (("applied", MUON_NEW_P, {"resume_changes": "apply"}), ("same", MUON_SAVED_P, {})):
        del kept.messages[:]
        engine = muon_engine(stage, power, **params)
        engine.load_checkpoint(folder, tag="saved")
        optimizer = engine.basic_optimizer
        res[f"{name} muon power"] = optimizer.muon_power
        res[f"{name} groups"] = [(g["use_muon"], g["power"]) for g in optimizer.param_groups]
        res[f"{name} warnings"] = list(kept.messages)
        ds_toy.train(engine, rank, STEPS - SAVE_AT, first_step=SAVE_AT)
        res[name] = ds_toy.full_fp32_params(engine)
        engine.destroy()
    return res


if __name__ == "__main__":
    exit_when_done(main)
