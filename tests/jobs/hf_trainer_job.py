"""An ordinary Hugging Face Trainer script with DeepSpeed (``--deepspeed ds_config.json``) that knows nothing of
gradpower_ds: the optimizer comes from the DeepSpeed config's "optimizer" section, built by DeepSpeed.

Started as ``deepspeed --module gradpower_ds.jobs.run hf_trainer_job.py --deepspeed CONFIG --out DIR`` (or under
torchrun, ``-m gradpower_ds.jobs.run``) its config may say ``"type": "AdamPower"``. A tiny LLaMA built from a config (no
downloads) trains ``--steps`` steps on an in-memory dataset; each rank writes what a test needs to
``DIR/rank<R>.json``.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from gradpower_ds.jobs.processes import exit_when_done

VOCAB, SEQ = 64, 16


class Tokens(torch.utils.data.Dataset):
    """`n` fixed random sequences of SEQ tokens (labels = inputs)."""

    def __init__(self, n: int = 64):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deepspeed", required=True, help="DeepSpeed JSON config")
    parser.add_argument("--out", required=True, help="folder for rank<R>.json")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ))
    training_args = TrainingArguments(
        output_dir=args.out, deepspeed=args.deepspeed, max_steps=args.steps, per_device_train_batch_size=2,
        learning_rate=1e-2, adam_beta2=0.95, weight_decay=0.1, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0,
        # Without a GPU accelerate 1.15 gives DeepSpeed no process group backend and counts one process per rank
        # (DeepSpeed then fails: train_batch_size 2 != 2 * 1 * 2); use_cpu sets up gloo over all ranks first.
        use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=training_args, train_dataset=Tokens())
    trainer.train()
    engine = trainer.model_wrapped
    optimizer = engine.basic_optimizer
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    rank = trainer.args.process_index
    record = dict(
        engine=type(engine).__name__, optimizer=type(optimizer).__name__,
        powers=sorted({group["power"] for group in optimizer.param_groups if "power" in group}),
        steps=sorted({float(state["step"]) for state in optimizer.state.values() if "step" in state}),
        world_size=trainer.args.world_size, process_index=trainer.args.process_index, losses=losses,
        all_finite=all(math.isfinite(loss) for loss in losses))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(record))
    # end the process group before exit: a live gloo group torn down at interpreter exit can abort a rank
    # ("terminate called without an active exception", seen once in CI)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    exit_when_done(main)
