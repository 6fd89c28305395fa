"""An ordinary Hugging Face accelerate training loop with a DeepSpeed plugin, plus the one-line hook.

Started as ``accelerate launch --config_file ACCELERATE.yaml accelerate_job.py --out DIR``, where the accelerate
config names a DeepSpeed config (``deepspeed_config_file``) whose "optimizer" section says ``"type": "AdamPower"``;
or, with ``--no_hook`` (the script then registers nothing), as
``accelerate launch --config_file ACCELERATE.yaml -m gradpower_ds.jobs.run accelerate_job.py --no_hook --out DIR``.
The optimizer is built by DeepSpeed from that config (the loop passes accelerate's ``DummyOptim``). A tiny LLaMA
built from a config (no downloads) trains ``--steps`` steps on an in-memory dataset; each rank writes what a test
needs to ``DIR/rank<R>.json``.
"""

import sys

if "--no_hook" not in sys.argv:  # the one-line hook (two with the import): "type": "AdamPower" in DeepSpeed configs
    import gradpower_ds.deepspeed
    gradpower_ds.deepspeed.register()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import DummyOptim  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from gradpower_ds.jobs.processes import exit_when_done  # noqa: E402

VOCAB, SEQ = 64, 16


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder for rank<R>.json")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no_hook", action="store_true", help="do not call register() (run under gradpower_ds.jobs.run)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        # accelerate 1.15 gives DeepSpeed no process group backend without a GPU (it would count one process per
        # rank); a CPU state set up first (gloo, all ranks) is what TrainingArguments(use_cpu=True) does too.
        PartialState(cpu=True)
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ))
    ids = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=2)
    optimizer = DummyOptim(model.parameters())  # the DeepSpeed config's "optimizer" section builds the real one
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for _, batch in zip(range(args.steps), loader):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    built = model.basic_optimizer  # model is the DeepSpeedEngine accelerate built
    record = dict(
        engine=type(model).__name__, optimizer=type(built).__name__,
        powers=sorted({group["power"] for group in built.param_groups if "power" in group}),
        steps=sorted({float(state["step"]) for state in built.state.values() if "step" in state}),
        distributed_type=str(accelerator.distributed_type), world_size=accelerator.num_processes,
        losses=losses, all_finite=all(math.isfinite(loss) for loss in losses))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.end_training()  # waits for every rank, then ends the process group (no live group at exit)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    exit_when_done(main)
