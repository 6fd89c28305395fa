"""GPAS: the gate's maths against autograd and the formula, identity at init (dense, and with DeepSpeed's MoE
layer in one launched job), every placement against a hand-written block, torch.compile, bf16 autocast, Hugging
Face models, grouping and clipping."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import free_port, launch_env
from gradpower_ds import (GPASGate, apply_gpas, clip_gate_grad_norm_, gpas_scale, param_groups_with_gpas,
                          register_gate_grad_clip, remove_gpas)
from gradpower_ds.gpas import ACTIVATIONS, gate_parameters
from gradpower_ds.jobs.model import CausalLM, DecoderLayer, ModelConfig, rope_tables
from jobs import ds_gpas_identity

IDENTITY_JOB = Path(__file__).resolve().parent / "jobs" / "ds_gpas_identity.py"

ACT_DERIVATIVES = {
    "silu": lambda a: torch.sigmoid(a) * (1 + a * (1 - torch.sigmoid(a))),
    "identity": lambda a: torch.ones_like(a),
    "sigmoid": lambda a: torch.sigmoid(a) * (1 - torch.sigmoid(a)),
    "tanh": lambda a: 1 - torch.tanh(a) ** 2,
    "relu": lambda a: (a > 0).float(),
}


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_gate_forward_backward_match_the_formula(act):
    gate = GPASGate(act)
    with torch.no_grad():
        gate.alpha.fill_(0.7)
    x = torch.randn(3, 5, requires_grad=True)
    dy = torch.randn(3, 5)
    y = gate(x)
    s = ACTIVATIONS[act](torch.tensor(0.7))
    torch.testing.assert_close(y, (1 - s) * x)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy)  # the gradient to x is preserved
    expected = -ACT_DERIVATIVES[act](torch.tensor(0.7)) * (dy * x).sum()
    torch.testing.assert_close(gate.alpha.grad, expected.reshape(1))


def test_fixed_gate_is_a_buffer():
    gate = GPASGate("identity", learnable=False, init=0.1)
    assert not list(gate.parameters())
    x = torch.randn(4)
    torch.testing.assert_close(gate(x), 0.9 * x)


def test_bad_gate_arguments():
    with pytest.raises(ValueError, match="act"):
        GPASGate("gelu")
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(norm="post_ln")


def test_bf16_autocast_keeps_the_gate_fp32():
    gate = GPASGate()
    with torch.no_grad():
        gate.alpha.fill_(0.3)
    x = torch.randn(8, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gate(x)
    assert y.dtype == torch.bfloat16 and gate.alpha.dtype == torch.float32
    torch.testing.assert_close(y.float(), (1 - F.silu(torch.tensor(0.3))) * x.float(), rtol=1e-2, atol=1e-2)


def test_torch_compile(tmp_path, monkeypatch):
    # A private inductor cache: the shared one (/tmp/torchinductor_$USER) can hand back a kernel compiled for
    # another vector width than this process picks (seen with ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU after
    # a run without it: half the lanes wrong), which would test the cache, not the gate.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    gate = GPASGate()
    with torch.no_grad():
        gate.alpha.fill_(0.4)
    x = torch.randn(32, requires_grad=True)
    compiled = torch.compile(gate)
    y = compiled(x)
    torch.testing.assert_close(y, gpas_scale(x.detach(), gate.alpha.detach()))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(32))
    torch.testing.assert_close(gate.alpha.grad, -ACT_DERIVATIVES["silu"](torch.tensor(0.4)) * x.detach().sum().reshape(1))


NORMS = ["pre_ln", "sandwich_ln", "deepnorm", "mix_ln", "lns"]


@pytest.mark.parametrize("norm", NORMS)
def test_identity_at_init(norm):
    """Bitwise-equal logits and gradients with and without gates at init (jobs/ds_gpas_identity.py), dense."""
    ds_gpas_identity.identity_at_init(norm, experts=0)


def test_identity_at_init_with_deepspeed_moe():
    """The same with 4 experts (DeepSpeed's MoE layer needs torch.distributed): every norm in one world-of-one job."""
    env = launch_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, str(IDENTITY_JOB), *NORMS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("ok ")] == [f"ok {n}" for n in NORMS]


def reference_layer(layer: DecoderLayer, x, cos, sin, s):
    """The GPAS placements written out by hand with the layer's own sublayers; s = act(alpha)."""
    g = lambda t: (1 - s) * t  # noqa: E731 - forward value of the gate
    if layer.style == "deepnorm":
        a = layer.deepnorm_alpha
        h = layer.norm1(a * g(x) + layer.attn(x, cos, sin))
        return layer.norm2(a * g(h) + layer.mlp(h))
    if layer.style == "sandwich_ln":
        h = g(x + layer.post_norm1(layer.attn(layer.norm1(x), cos, sin)))
        return g(h + layer.post_norm2(layer.mlp(layer.norm2(h))))
    c = layer.scale
    h = g(x + layer.attn(layer.norm1(x) * c, cos, sin))
    return g(h + layer.mlp(layer.norm2(h) * c))


@pytest.mark.parametrize("norm", NORMS)
def test_each_placement_matches_hand_written_block(norm):
    cfg = ModelConfig(norm=norm, n_layers=4, dim=32, n_heads=4, ffn_dim=64, num_experts=0, gpas=True)
    cos, sin = rope_tables(cfg)
    styles = set()
    for index in range(cfg.n_layers):
        layer = DecoderLayer(cfg, index)
        styles.add(layer.style)
        with torch.no_grad():
            layer.gpas_gate.alpha.fill_(0.6)
        x = torch.randn(2, 7, 32)
        out = layer(x, cos, sin)
        torch.testing.assert_close(out, reference_layer(layer, x, cos, sin, F.silu(torch.tensor(0.6))))
    if norm == "mix_ln":
        assert styles == {"deepnorm", "pre_ln"}
    if norm == "lns":
        assert DecoderLayer(cfg, 3).scale == pytest.approx(0.5)


def tiny_hf_models():
    from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM)

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    return [
        LlamaForCausalLM(LlamaConfig(**common)),
        Qwen2ForCausalLM(Qwen2Config(**common)),
        Qwen2MoeForCausalLM(Qwen2MoeConfig(**common, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                           num_experts=4, num_experts_per_tok=2)),
        MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)),
    ]


@pytest.mark.parametrize("index", range(4))
def test_hugging_face_models(index):
    torch.manual_seed(0)
    model = tiny_hf_models()[index]
    tokens = torch.randint(0, 64, (2, 10))
    before = model(tokens, labels=tokens)
    before.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    apply_gpas(model)
    apply_gpas(model)  # idempotent
    assert len(gate_parameters(model)) == model.config.num_hidden_layers
    after = model(tokens, labels=tokens)
    assert torch.equal(before.logits, after.logits), "identity at init"
    after.loss.backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n

    # one layer against the Pre-LN placement written out by hand
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.gpas_gate.alpha.fill_(0.5)
    x = torch.randn(2, 10, 32)
    position_ids = torch.arange(10)[None].expand(2, -1)
    kwargs = dict(position_embeddings=model.model.rotary_emb(x, position_ids), position_ids=position_ids,
                  attention_mask=None)
    s = F.silu(torch.tensor(0.5))
    h = (1 - s) * (x + layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0])
    expected = (1 - s) * (h + layer.mlp(layer.post_attention_layernorm(h)))
    torch.testing.assert_close(layer(x, **kwargs), expected)

    remove_gpas(model)
    assert not gate_parameters(model)
    assert torch.equal(model(tokens).logits, before.logits)


def test_unknown_model_and_bad_variant():
    with pytest.raises(TypeError, match=r"Hugging Face models .* and models with their own apply_gpas\(variant, act, "
                                        r"learnable\) and remove_gpas\(\) methods"):
        apply_gpas(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Pre-LN"):
        apply_gpas(tiny_hf_models()[0], variant="deepnorm")
    with pytest.raises(ValueError, match="norm='pre_ln'"):
        apply_gpas(CausalLM(ModelConfig(ffn_dim=352, num_experts=0)), variant="sandwich_ln")


def test_param_groups_and_gate_clipping():
    model = apply_gpas(CausalLM(ModelConfig(n_layers=2, dim=32, n_heads=4, ffn_dim=64, num_experts=0)))
    groups = param_groups_with_gpas(model, weight_decay=0.1, lr=1e-3)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in gate_parameters(model)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    tokens = torch.randint(0, 256, (2, 16))
    model(tokens, tokens)[1].mul(1e4).backward()
    norm = clip_gate_grad_norm_(model, 0.01)
    assert norm > 0.01
    assert torch.cat([p.grad for p in gate_parameters(model)]).norm() == pytest.approx(0.01, rel=1e-4)

    model.zero_grad()
    handles = register_gate_grad_clip(model, 0.01)
    model(tokens, tokens)[1].mul(1e4).backward()
    assert all(p.grad.abs().item() <= 0.01 for p in gate_parameters(model))
    assert any(p.grad.abs().item() == pytest.approx(0.01) for p in gate_parameters(model))
    for h in handles:
        h.remove()
