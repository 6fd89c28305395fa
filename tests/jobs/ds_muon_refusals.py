"""Launched job (1 rank): MuonPower configs that deepspeed.initialize must refuse; prints "REFUSED label: message"
for each ValueError, "ACCEPTED label" for a config that was built."""

import deepspeed
import torch

import ds_toy
from ds_muon import MUON_PARAMS
from gradpower_ds.deepspeed import register
from gradpower_ds.jobs.processes import exit_when_done


class NoMatrix(torch.nn.Module):
    """An embedding and a norm: nothing DeepSpeed would give Muon."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.norm = torch.nn.LayerNorm(4)


CASES = {
    "no power": (MUON_PARAMS, "fp32", ds_toy.make_model),
    "power 0": (dict(MUON_PARAMS, power=0), "fp32", ds_toy.make_model),
    "adam_power -1": (dict(MUON_PARAMS, power=0.9, adam_power=-1), "fp32", ds_toy.make_model),
    "unknown key": (dict(MUON_PARAMS, power=0.9, nesterov=False), "fp32", ds_toy.make_model),
    "fp16": (dict(MUON_PARAMS, power=0.9), "fp16", ds_toy.make_model),
    "no matrix": (dict(MUON_PARAMS, power=0.9), "fp32", NoMatrix),
}


def main():
    register()
    ds_toy.enable_cpu_fp16()  # so that DeepSpeed itself gets as far as building the optimizer
    deepspeed.init_distributed(dist_backend="gloo")
    for label, (params, dtype, make_model) in CASES.items():
        model = make_model()
        config = ds_toy.ds_config(1, dtype, opt_type="MuonPower", params=params, clip=0.0)
        try:
            deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        except ValueError as error:
            print(f"REFUSED {label}: {' '.join(str(error).split())}", flush=True)
        else:
            print(f"ACCEPTED {label}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    exit_when_done(main)
