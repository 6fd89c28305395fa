"""Launched job: a DeepSpeed checkpoint resumed with another power, under the resume policy (issue 35, item 4).

``ds_resume_policy.py ROOT OUT`` (2 ranks): for each ZeRO stage of STAGES, an AdamPower run (power SAVED_P)
trains SAVE_AT steps and saves under ROOT/z<stage>; then engines loading it: with power NEW_P (refused: the
ValueError's message is kept), with power NEW_P and ``"resume_changes": "apply"`` (its groups and the warning
logged are kept) and with power SAVED_P, the last two training on to STEPS. Rank 0 writes what each did to OUT.
"""

import logging
import sys

import deepspeed

from gradpower_ds import deepspeed as gds
from gradpower_ds.jobs.processes import exit_when_done

try:
    import ds_toy  # launched: tests/jobs is sys.path[0]
except ImportError:  # imported by the tests as jobs.ds_resume_policy, for STAGES
    from jobs import ds_toy

STEPS, SAVE_AT = 3, 1
STAGES = (2, 3)
SAVED_P, NEW_P = 1.2, 1.5


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
        folder, res = f"{root}/z{stage}", {}
        saved = ds_toy.adam_power_engine(stage, power=SAVED_P)
        ds_toy.train(saved, rank, SAVE_AT)
        saved.save_checkpoint(folder, tag="saved")
        saved.destroy()
        refused = ds_toy.adam_power_engine(stage, power=NEW_P)
        try:
            refused.load_checkpoint(folder, tag="saved")
            res["refused"] = None
        except ValueError as error:
            res["refused"] = str(error)
        refused.destroy()
        for name, power, params in (("applied", NEW_P, {"resume_changes": "apply"}), ("same", SAVED_P, {})):
            del kept.messages[:]
            engine = ds_toy.adam_power_engine(stage, power=power, **params)
            engine.load_checkpoint(folder, tag="saved")
            res[f"{name} groups"] = [g["power"] for g in engine.basic_optimizer.param_groups]
            res[f"{name} warnings"] = list(kept.messages)
            res[f"{name} losses"] = ds_toy.train(engine, rank, STEPS - SAVE_AT, first_step=SAVE_AT)
            res[name] = ds_toy.full_fp32_params(engine)
            engine.destroy()
        results[f"z{stage}"] = res
    ds_toy.save_and_finish(results, out)


if __name__ == "__main__":
    exit_when_done(main)
