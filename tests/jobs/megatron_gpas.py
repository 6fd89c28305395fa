"""2-rank job: GPAS in megatron-core TransformerLayers (``megatron_patches.apply_gpas``), dense and MoE (EP=2).

Launched by tests/test_megatron_gpas.py (torch.distributed.run, 2 CPU ranks, gloo,
tests/megatron_cpu_shim.py). For a tiny GPTModel, dense and MoE (4 experts, top-1,
EP=2, alltoall), it measures and writes to argv[1] (JSON, rank 0):

- identity (also for MoETransformerLayer, which the local spec does not build): logits and every shared parameter's gradient of the GPAS model at init
  minus the unpatched model's (same seed), all ranks; the gate's local gradient;
- layer: on layer 0 with alpha = 0.3 (and 0.25 for act="identity"), the layer output
  minus a plain-PyTorch reference ``h = (x + attn(ln1 x)) * (1 - act(alpha));
  out = (h + mlp(ln2 h)) * (1 - act(alpha))`` built from the layer's own sublayers,
  and the input gradient minus that of a straight-through reference
  (``h + (h * (1 - act(alpha)) - h).detach()``) and minus that of the plain
  reference (which must differ: the gate does change the forward);
- ddp: megatron DDP (fp32) + get_megatron_optimizer (adam, weight_decay 0.1): the
  gates' reduced gradients on every rank, the mean of the ranks' local ones, the
  optimizer param group holding each gate (wd_mult), alpha after one step;
- reversible: enable twice, disable, enable again (state-dict keys, forward pre-hooks, outputs);
- no_grad: with alpha = 0.3, each layer's output (a forward hook) and the logits
  under ``torch.no_grad()`` (eval and train mode) must hold no autograd graph
  (Megatron runs the bias-dropout-add under ``torch.enable_grad()``), and equal the
  grad-enabled eval-mode forward bit for bit, which still gives alpha a gradient,
  also with every other parameter frozen and with full activation recomputation
  (reentrant: its first forward runs under no_grad); remove_gpas removes the
  forward pre-hooks;
- refusals: the error message for each unsupported configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (the shim)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (gradpower_ds, megatron_patches)

import megatron_cpu_shim  # noqa: E402

megatron_cpu_shim.install()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
import megatron.core.optimizer as mcore_optimizer  # noqa: E402  (get_megatron_optimizer: looked up after apply())
from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.identity_op import IdentityFuncOp  # noqa: E402
from megatron.core.transformer import transformer_layer  # noqa: E402

import megatron_patches  # noqa: E402
from gradpower_ds.gpas import GPASGate  # noqa: E402
from gradpower_ds.jobs.processes import exit_when_done  # noqa: E402
from megatron_patches.gpas import GPASUnsupportedError  # noqa: E402
from megatron_patches.optimizer import inner_optimizers  # noqa: E402

VOCAB, SEQ, BATCH, HIDDEN, EXPERTS, EP = 64, 8, 2, 16, 4, 2


def gpas_gates(model) -> list:
    """The GPAS gates of a model (through any wrappers), in layer order."""
    return [m for m in model.modules() if isinstance(m, GPASGate)]


def build(kind: str, seed: int = 1234, **extra) -> GPTModel:
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    moe = dict(num_moe_experts=EXPERTS, moe_router_topk=1, moe_router_pre_softmax=True,
               moe_token_dispatcher_type="alltoall", moe_ffn_hidden_size=32, expert_model_parallel_size=EP,
               moe_aux_loss_coeff=0.01) if kind.startswith("moe") else {}
    config = TransformerConfig(num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=32, num_attention_heads=2,
                               add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0,
                               attention_dropout=0.0, **moe, **extra)
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS if moe else None, moe_grouped_gemm=False)
    if kind == "moe_layer_class":  # the local spec builds TransformerLayer; MoETransformerLayer reaches the same bda
        spec = dataclasses.replace(spec, module=transformer_layer.MoETransformerLayer)
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope")


def batch(step: int = 0):
    gen = torch.Generator().manual_seed(100 * step + dist.get_rank())
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], torch.arange(SEQ).expand(BATCH, SEQ), tokens[:, 1:]


def all_max(value: float) -> float:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, float(value))
    return max(out)


def gathered(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def identity_case(kind: str) -> dict:
    ref, gp = build(kind), build(kind)
    layers = megatron_patches.apply_gpas(gp)
    tokens, pos, labels = batch()
    out_ref, out_gp = ref(tokens, pos, None), gp(tokens, pos, None)
    ref(tokens, pos, None, labels=labels).float().mean().backward()
    gp(tokens, pos, None, labels=labels).float().mean().backward()
    ref_params = dict(ref.named_parameters())
    grad_diff = max(max_abs(p.grad, ref_params[n].grad) for n, p in gp.named_parameters() if "gpas_gate" not in n)
    gate_names = [n for n, _ in gp.named_parameters() if "gpas_gate" in n]
    return dict(n_layers=len(layers), gate_names=gate_names, layer_classes=[type(x).__name__ for x in layers],
                logits_diff=all_max(max_abs(out_gp, out_ref)),
                grad_diff=all_max(grad_diff),
                gate_local_grads=gathered([g.alpha.grad.item() for g in gpas_gates(gp)]),
                gate_dtype=str(gpas_gates(gp)[0].alpha.dtype),
                gate_attrs=dict(sequence_parallel=gpas_gates(gp)[0].alpha.sequence_parallel,
                                allreduce=getattr(gpas_gates(gp)[0].alpha, "allreduce", True)))


def layer_case(kind: str, act: str, alpha: float) -> dict:
    model = build(kind)
    megatron_patches.apply_gpas(model, act=act)
    layer = model.decoder.layers[0]
    gate = layer.gpas_gate
    with torch.no_grad():
        gate.alpha.fill_(alpha)
    scale = 1 - {"silu": F.silu, "identity": lambda a: a}[act](torch.tensor(alpha, dtype=torch.float32))
    gen = torch.Generator().manual_seed(7 + dist.get_rank())
    x0 = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    cotangent = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)

    def reference(x, gate_fn):
        h = gate_fn(x + layer.self_attention(layer.input_layernorm(x), attention_mask=None)[0])
        return gate_fn(h + layer.mlp(layer.pre_mlp_layernorm(h))[0])

    def run(fn):
        x = x0.clone().requires_grad_(True)
        out = fn(x)
        (out * cotangent).sum().backward()
        return out.detach(), x.grad

    out, grad = run(lambda x: layer(hidden_states=x, attention_mask=None)[0])
    ref_out, ref_grad = run(lambda x: reference(x, lambda h: h * scale))
    st_out, st_grad = run(lambda x: reference(x, lambda h: h + (h * scale - h).detach()))
    return dict(scale=scale.item(), out_vs_plain=all_max(max_abs(out, ref_out)),
                out_vs_straight_through=all_max(max_abs(out, st_out)),
                grad_vs_straight_through=all_max(max_abs(grad, st_grad)),
                grad_vs_plain=all_max(max_abs(grad, ref_grad)), grad_max=all_max(grad.abs().max().item()),
                out_minus_ungated=all_max(max_abs(out, reference(x0, lambda h: h))))


def ddp_case(kind: str) -> dict:
    model = build(kind)
    megatron_patches.apply_gpas(model)
    config = model.config
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=False,
                                                                       overlap_grad_reduce=False), model)
    ddp.broadcast_params()
    opt = mcore_optimizer.get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1,
                                                 use_distributed_optimizer=False), [ddp])
    gates = [g.alpha for g in gpas_gates(model)]
    groups = [g for inner in inner_optimizers(opt) for g in inner.param_groups]
    gate_groups = [[dict(wd_mult=g["wd_mult"], is_expert_parallel=g["is_expert_parallel"], n_params=len(g["params"]))
                    for g in groups if any(p is a for p in g["params"])] for a in gates]
    other_wd = sorted({g["wd_mult"] for g in groups})
    ddp.zero_grad_buffer()
    opt.zero_grad()
    tokens, pos, labels = batch(1)
    ddp(tokens, pos, None, labels=labels).float().mean().backward()
    local = gathered([a.main_grad.item() for a in gates])
    ddp.finish_grad_sync()
    reduced = gathered([a.main_grad.item() for a in gates])
    ok, _, _ = opt.step()
    after = gathered([a.item() for a in gates])
    sharded_keys = [k for k in model.sharded_state_dict().keys() if "gpas_gate" in k]
    return dict(local=local, reduced=reduced, gate_groups=gate_groups, wd_mults=other_wd, step_ok=bool(ok),
                alpha_after=after, sharded_keys=sharded_keys)


def reversible_case(kind: str) -> dict:
    ref, model = build(kind), build(kind)
    keys, n_params = sorted(model.state_dict()), sum(1 for _ in model.parameters())
    bdas = {n: model.decoder.layers[0].__dict__[n] for n in ("self_attn_bda", "mlp_bda")}
    megatron_patches.apply_gpas(model)
    gates1 = gpas_gates(model)
    megatron_patches.apply_gpas(model)  # idempotent
    gates2 = gpas_gates(model)
    pre_hooks = [len(layer._forward_pre_hooks) for layer in model.decoder.layers]
    n_params_enabled = sum(1 for _ in model.parameters())
    keys_enabled = sorted(model.state_dict())
    with torch.no_grad():
        for g in gates2:
            g.alpha.fill_(0.5)
    tokens, pos, _ = batch()
    changed = max_abs(model(tokens, pos, None), ref(tokens, pos, None))
    megatron_patches.remove_gpas(model)
    megatron_patches.remove_gpas(model)  # a no-op now
    restored = max_abs(model(tokens, pos, None), ref(tokens, pos, None))
    return dict(same_gates_after_second_enable=all(a is b for a, b in zip(gates1, gates2)) and len(gates1) == 2,
                added_keys=sorted(set(keys_enabled) - set(keys)), n_params_added=n_params_enabled - n_params,
                pre_hooks_enabled=pre_hooks,
                keys_restored=sorted(model.state_dict()) == keys,
                bdas_restored=all(model.decoder.layers[0].__dict__[n] is f for n, f in bdas.items()),
                no_attrs_left=all("_gpas_original_bda" not in layer.__dict__ and "gpas_gate" not in layer._modules
                                  and "_gpas_grad_mode_hook" not in layer.__dict__ and not layer._forward_pre_hooks
                                  for layer in model.decoder.layers),
                out_changed_by_gate=all_max(changed), out_after_disable=all_max(restored))


def no_grad_case(kind: str) -> dict:
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model, frozen, recomputed = build(kind), build(kind), build(kind, **recompute)
    hooks = [list(layer._forward_pre_hooks) for layer in model.decoder.layers]
    for m in (model, frozen, recomputed):
        megatron_patches.apply_gpas(m)
        with torch.no_grad():
            for g in gpas_gates(m):
                g.alpha.fill_(0.3)
    gate_ids = {id(g.alpha) for g in gpas_gates(frozen)}
    for p in frozen.parameters():
        p.requires_grad_(id(p) in gate_ids)
    hooks_enabled = [list(layer._forward_pre_hooks) for layer in model.decoder.layers]
    tokens, pos, _ = batch()
    outputs = []
    handles = [layer.register_forward_hook(lambda mod, args, out: outputs.append(out[0]))
               for layer in model.decoder.layers]

    def forward(grad: bool, training: bool) -> list:
        """[logits, each layer's output]"""
        outputs.clear()
        model.train(training)
        with torch.set_grad_enabled(grad):
            return [model(tokens, pos, None), *outputs]

    graph_kept = {}
    for training in (True, False):  # eval last: `no_grad` is compared with the eval-mode grad-enabled forward
        no_grad = forward(False, training)
        graph_kept[f"train={training}"] = gathered(any(t.requires_grad or t.grad_fn is not None for t in no_grad))
    with_grad = forward(True, False)
    with_grad[0].float().mean().backward()
    for handle in handles:
        handle.remove()

    # the recompute (in backward) runs outside the shim's TorchFunctionMode, where megatron's default
    # causal mask (device="cuda") would fail: give both models the same mask explicitly
    causal = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)

    def train_alpha_grads(m):
        m(tokens, pos, causal).float().mean().backward()
        return [None if g.alpha.grad is None else g.alpha.grad.item() for g in gpas_gates(m)]

    eval_alpha_grads = gathered([g.alpha.grad.item() for g in gpas_gates(model)])
    megatron_patches.remove_gpas(model)
    return dict(graph_kept=graph_kept, n_outputs=len(no_grad), eval_alpha_grads=eval_alpha_grads,
                no_grad_vs_grad=all_max(max(max_abs(a, b) for a, b in zip(no_grad, with_grad))),
                frozen_alpha_grads=gathered(train_alpha_grads(frozen)),
                recompute_alpha_grads=gathered(train_alpha_grads(recomputed)),
                hooks_added=[len(b) - len(a) for a, b in zip(hooks, hooks_enabled)],
                hooks_restored=[list(layer._forward_pre_hooks) for layer in model.decoder.layers] == hooks)


def refusal_case() -> dict:
    errors = {}

    def attempt(name, target, prepare=None):
        model = build("moe")
        if prepare is not None:
            target = prepare(model)
        try:
            megatron_patches.apply_gpas(target if target is not None else model)
            errors[name] = None
        except GPASUnsupportedError as e:
            errors[name] = str(e)
            errors[name + "_untouched"] = all("gpas_gate" not in layer._modules for layer in model.decoder.layers)

    def with_flag(flag, value):
        def prepare(model):
            config = copy.copy(model.decoder.layers[1].config)
            setattr(config, flag, value)
            model.decoder.layers[1].config = config
            return model
        return prepare

    for flag, value in [("cuda_graph_impl", "local"), ("cuda_graph_impl", "transformer_engine"),
                        ("enable_cuda_graph", True), ("external_cuda_graph", True),
                        ("overlap_moe_expert_parallel_comm", True), ("inference_fuse_tp_communication", True)]:
        attempt(f"{flag}={value}", None, with_flag(flag, value))

    def cross_attention(model):
        model.decoder.layers[1].cross_attention = torch.nn.Linear(2, 2)
        return model

    def identity_bda(model):
        model.decoder.layers[1].__dict__["mlp_bda"] = IdentityFuncOp()
        return model

    def ddp_wrapped(model):
        return DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)

    def ddp_inner(model):
        return ddp_wrapped(model).module

    attempt("cross_attention", None, cross_attention)
    attempt("identity_bda", None, identity_bda)
    attempt("ddp_wrapped", None, ddp_wrapped)
    attempt("ddp_inner", None, ddp_inner)
    attempt("no_layers", torch.nn.Linear(2, 2))
    return errors


def main() -> None:
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(expert_model_parallel_size=EP)
    results = {}
    for kind in ("dense", "moe"):
        results[f"{kind}_identity"] = identity_case(kind)
        results[f"{kind}_layer_silu"] = layer_case(kind, "silu", 0.3)
        results[f"{kind}_layer_identity"] = layer_case(kind, "identity", 0.25)
        results[f"{kind}_ddp"] = ddp_case(kind)
        results[f"{kind}_reversible"] = reversible_case(kind)
        results[f"{kind}_no_grad"] = no_grad_case(kind)
        if dist.get_rank() == 0:
            print(kind, json.dumps({k: v for k, v in results.items() if k.startswith(kind)}), flush=True)
    if hasattr(transformer_layer, "MoETransformerLayer"):  # megatron-core 0.16.0 on
        results["moe_layer_class_identity"] = identity_case("moe_layer_class")
        results["moe_layer_class_layer_silu"] = layer_case("moe_layer_class", "silu", 0.3)
    results["refusals"] = refusal_case()
    if dist.get_rank() == 0:
        print(json.dumps(results["refusals"], indent=1), flush=True)
        if len(sys.argv) > 1:
            Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_when_done(main)
