"""Blockwise learning rates (gradpower_ds.blockwise): which block each parameter of the supported models is in, the
param groups and their lrs, one optimizer step against per-parameter AdamPower at the expected lr, and the errors.

The expected blocks are written out here by name, apart from the rules they test. The DeepSpeed path (ZeRO 0-3,
offload, schedulers, MoE) is tests/test_blockwise_deepspeed.py; megatron-core's is tests/test_megatron_blockwise.py.
"""

import re

import pytest
import torch
from torch import nn

from gradpower_ds import AdamPower, blockwise_param_groups
from gradpower_ds.blockwise import (BLOCK_MULTIPLIERS, LR_MULTIPLIER_KEY, base_lr, block_of, check_scheduled_lrs,
                                    resolve_multipliers)
from gradpower_ds.gpas import apply_gpas
from gradpower_ds.jobs.model import CausalLM, ModelConfig
from gradpower_ds.jobs.train_config import ConfigError, TrainConfig
from test_gpas import tiny_hf_models

# the paper's multipliers by name pattern, written out independently of the rules in gradpower_ds.blockwise
EXPECTED = ((r"embed", 10.0), (r"(q_proj|k_proj)\.", 8.0), (r"(v_proj|o_proj)\.", 4.0), (r"norm", 1.0),
            (r"gpas_gate", 1.0), (r"lm_head", 1.0), (r"\.mlp\.", 6.0))


def expected_multiplier(name: str) -> float:
    return next(m for pattern, m in EXPECTED if re.search(pattern, name))


def dense_model(**kwargs) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(n_layers=2, dim=32, n_heads=4, ffn_dim=64, num_experts=0, vocab_size=64,
                                max_seq_len=16, **kwargs))


def check_groups(model: nn.Module, base: float = 1e-3) -> list[dict]:
    groups = blockwise_param_groups(model, base, weight_decay=0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad), "each parameter once"
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        group = by_id[id(p)]
        assert group["lr"] == pytest.approx(base * expected_multiplier(name)), name
        assert group["weight_decay"] == (0.0 if "gpas_gate" in name else 0.1), name
    assert len({g["name"] for g in groups}) == len(groups), "unique names, for DeepSpeed's MoE split"
    return groups


@pytest.mark.parametrize("norm", ["pre_ln", "sandwich_ln"])
def test_our_model_blocks(norm):
    groups = check_groups(dense_model(norm=norm, gpas=True))
    assert {g["name"] for g in groups} == {f"blockwise_{b}" for b in BLOCK_MULTIPLIERS}


@pytest.mark.parametrize("index", range(4))
def test_hugging_face_blocks(index):
    model = apply_gpas(tiny_hf_models()[index])
    check_groups(model)


def test_megatron_gpt_model_names():
    names = {"embedding.word_embeddings.weight": "embedding", "embedding.position_embeddings.weight": "embedding",
             "decoder.layers.0.input_layernorm.weight": "norm",
             "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": "norm",
             "decoder.layers.0.self_attention.q_layernorm.weight": "norm",
             "decoder.layers.0.self_attention.linear_qkv.weight": "qkv",
             "decoder.layers.0.self_attention.linear_qkv.bias": "qkv",
             "decoder.layers.0.self_attention.linear_proj.weight": "vo",
             "decoder.layers.0.mlp.linear_fc1.weight": "ffn", "decoder.layers.0.mlp.router.weight": "ffn",
             "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight": "ffn",
             "module.decoder.final_layernorm.weight": "norm", "output_layer.weight": "lm_head"}
    assert {n: block_of(n) for n in names} == names


def test_one_step_equals_adam_power_at_each_blocks_lr():
    model, reference = dense_model(), dense_model()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    optimizer = AdamPower(blockwise_param_groups(model, 1e-3, {"ffn": 3.0}, weight_decay=0.1), foreach=False)
    singles = {n: AdamPower([p], lr=1e-3 * (3.0 if ".mlp." in n else expected_multiplier(n)), weight_decay=0.1,
                            foreach=False) for n, p in reference.named_parameters()}
    for m in (model, reference):
        m(tokens, tokens)[1].backward()
    optimizer.step()
    for opt in singles.values():
        opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_multipliers_are_checked_and_named():
    assert resolve_multipliers({"embedding": 5})["embedding"] == 5.0
    with pytest.raises(ValueError, match=r"unknown block 'attention'.*\['embedding', 'ffn'"):
        resolve_multipliers({"attention": 2.0})
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match=r"multiplier of block 'qk' is .* finite number > 0"):
            resolve_multipliers({"qk": bad})
    with pytest.raises(ValueError, match="base_lr=0"):
        blockwise_param_groups(dense_model(), 0)


def test_unclassified_and_fused_parameters_are_named():
    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(4, 2)
            self.mixer = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"no block for mixer\.weight, mixer\.bias;"):
        blockwise_param_groups(Unknown(), 1e-3)

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_qkv = nn.Linear(2, 6)

    with pytest.raises(ValueError, match=r"linear_qkv\.weight holds Q, K and V rows.*blockwise_lr setting"):
        blockwise_param_groups(Fused(), 1e-3)


def test_frozen_parameters_are_left_out():
    model = dense_model()
    model.embed.weight.requires_grad_(False)
    groups = blockwise_param_groups(model, 1e-3)
    assert "blockwise_embedding" not in {g["name"] for g in groups}


def test_scheduled_lrs_check():
    groups = [{"name": "a", "lr": 8e-3, LR_MULTIPLIER_KEY: 8.0}, {"name": "b", "lr": 1e-3, LR_MULTIPLIER_KEY: 1.0},
              {"name": "untagged", "lr": 5.0}]
    check_scheduled_lrs(groups)
    assert base_lr(groups) == pytest.approx(1e-3)
    check_scheduled_lrs([dict(g, lr=0.0) for g in groups])
    groups[0]["lr"] = 1e-3
    with pytest.raises(ValueError, match=r"lose the blockwise multipliers \(a: 0.001 \(x8\), b: 0.001 \(x1\)\)"
                                         r".*WarmupCosineLR"):
        check_scheduled_lrs(groups)
    assert base_lr([{"lr": 2e-3}]) == 2e-3


def test_main_job_settings():
    cfg = TrainConfig(blockwise_lr=True, blockwise_multipliers={"embedding": 5})
    assert cfg.optimizer_label() == "adampower p=1.2 + blockwise lr"
    TrainConfig(blockwise_lr=True, optimizer="adamw")
    with pytest.raises(ConfigError, match="blockwise_lr with optimizer muon: DeepSpeed's Muon builds its own"):
        TrainConfig(blockwise_lr=True, optimizer="muon", grad_clip=0.0)
    with pytest.raises(ConfigError, match="blockwise_multipliers is set but blockwise_lr is false"):
        TrainConfig(blockwise_multipliers={"qk": 2.0})
    with pytest.raises(ConfigError, match="unknown block 'head'"):
        TrainConfig(blockwise_lr=True, blockwise_multipliers={"head": 2.0})
