"""megatron_patches.apply_gpas / remove_gpas: GPAS in megatron-core TransformerLayers.

Cheap (in-process): argument and version errors, and that apply()/remove() never touch GPAS.

Slow (one 2-rank launch, tests/jobs/megatron_gpas.py, ~15 s): tiny GPTModels, dense
and MoE (EP=2, alltoall): identity at init (logits and gradients bit for bit), the
gated layer against plain-PyTorch references (forward and input gradient), the gate
gradient under megatron DDP, its no-weight-decay param group, reversibility, no
autograd graph under torch.no_grad() and the refusals of unsupported configurations
(see the job's docstring).
"""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

import megatron.core  # noqa: E402

import megatron_patches  # noqa: E402
from conftest import torchrun  # noqa: E402
from megatron_patches.gpas import GPASUnsupportedError  # noqa: E402

JOBS = Path(__file__).parent / "jobs"


def test_unknown_act_and_no_layers():
    with pytest.raises(ValueError, match="unknown act='gelu'"):
        megatron_patches.apply_gpas(torch.nn.Linear(2, 2), act="gelu")
    with pytest.raises(GPASUnsupportedError, match="no megatron-core TransformerLayer found in \\['Linear'\\]"):
        megatron_patches.apply_gpas(torch.nn.Linear(2, 2))
    with pytest.raises(GPASUnsupportedError, match="no megatron-core TransformerLayer"):
        megatron_patches.remove_gpas([torch.nn.Linear(2, 2)])


def test_unsupported_version(monkeypatch):
    monkeypatch.setattr(megatron.core, "__version__", "0.20.0")
    with pytest.raises(megatron_patches.UnsupportedMegatronError, match=r"0\.20\.0 is installed"):
        megatron_patches.apply_gpas(torch.nn.Linear(2, 2))


def test_apply_does_not_enable_gpas():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    before = dict(vars(TransformerLayer))
    megatron_patches.apply()
    try:
        assert dict(vars(TransformerLayer)) == before
    finally:
        megatron_patches.remove()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron_gpas") / "results.json"
    torchrun(JOBS / "megatron_gpas.py", out, timeout=600)
    return json.loads(out.read_text())


KINDS = ("dense", "moe")


def _result(results: dict, case: str) -> dict:
    """One case of the job's results; the MoETransformerLayer cases skip where the class is missing (before 0.16)."""
    if case.startswith("moe_layer_class") and case not in results:
        pytest.skip(f"megatron-core {megatron.core.__version__} has no MoETransformerLayer (0.16.0 on)")
    return results[case]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS + ("moe_layer_class",))
def test_identity_at_init(results, kind):
    r = _result(results, f"{kind}_identity")
    assert r["gate_names"] == ["decoder.layers.0.gpas_gate.alpha", "decoder.layers.1.gpas_gate.alpha"]
    assert r["layer_classes"] == ["MoETransformerLayer" if kind == "moe_layer_class" else "TransformerLayer"] * 2
    assert r["logits_diff"] == 0.0 and r["grad_diff"] == 0.0  # bit for bit, all ranks
    assert all(g != 0.0 for rank in r["gate_local_grads"] for g in rank)
    assert r["gate_dtype"] == "torch.float32"
    assert r["gate_attrs"] == {"sequence_parallel": False, "allreduce": True}  # dense param, config.sequence_parallel


@pytest.mark.slow
@pytest.mark.parametrize("case", [f"{k}_layer_{a}" for k in KINDS for a in ("silu", "identity")]
                         + ["moe_layer_class_layer_silu"])
def test_layer_matches_plain_reference(results, case):
    r = _result(results, case)
    assert r["out_minus_ungated"] > 0.1  # the gate really scales the output
    # forward: (x + f(x)) * (1 - act(alpha)) per residual add; measured <= 1.2e-7
    assert r["out_vs_plain"] <= 5e-7 and r["out_vs_straight_through"] <= 5e-7
    # input gradient: that of the straight-through reference (gate = identity in backward); measured <= 1.5e-8
    assert r["grad_vs_straight_through"] <= 1e-6 * r["grad_max"]
    assert r["grad_vs_plain"] > 0.1  # ...and not the gradient of the plain product


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_gate_under_megatron_ddp_and_optimizer(results, kind):
    r = results[f"{kind}_ddp"]
    local, reduced = torch.tensor(r["local"]), torch.tensor(r["reduced"])
    assert torch.equal(reduced[0], reduced[1])  # the same on both ranks
    torch.testing.assert_close(reduced[0], local.mean(0), rtol=1e-6, atol=0)  # the data-parallel mean
    assert (reduced != 0).all()
    for groups in r["gate_groups"]:  # each gate in exactly one group: no weight decay, not expert-parallel
        assert len(groups) == 1 and groups[0]["wd_mult"] == 0.0 and not groups[0]["is_expert_parallel"]
    assert r["wd_mults"] == [0.0, 1.0]  # other params do get weight decay
    assert r["step_ok"] and r["alpha_after"][0] == r["alpha_after"][1] and all(a != 0 for a in r["alpha_after"][0])
    assert r["sharded_keys"] == ["decoder.layers.0.gpas_gate.alpha", "decoder.layers.1.gpas_gate.alpha"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_enable_disable_reversible(results, kind):
    r = results[f"{kind}_reversible"]
    assert r["same_gates_after_second_enable"] and r["n_params_added"] == 2 and r["pre_hooks_enabled"] == [1, 1]
    assert r["added_keys"] == ["decoder.layers.0.gpas_gate.alpha", "decoder.layers.1.gpas_gate.alpha"]
    assert r["out_changed_by_gate"] > 1e-3 and r["out_after_disable"] == 0.0
    assert r["keys_restored"] and r["bdas_restored"] and r["no_attrs_left"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_no_graph_under_no_grad(results, kind):
    r = results[f"{kind}_no_grad"]
    assert r["n_outputs"] == 3  # logits and both layers' outputs
    # Megatron's enable_grad() around the bda must not make a layer output keep a graph, in train or eval mode
    assert r["graph_kept"] == {"train=True": [False, False], "train=False": [False, False]}
    assert r["no_grad_vs_grad"] == 0.0  # the same values as with grad enabled, bit for bit
    # alpha's gradient follows the grad mode: eval mode, all other parameters frozen, reentrant recompute
    for grads in r["eval_alpha_grads"] + r["frozen_alpha_grads"]:
        assert len(grads) == 2 and all(g is not None and g != 0.0 for g in grads), grads
    torch.testing.assert_close(torch.tensor(r["recompute_alpha_grads"]), torch.tensor(r["frozen_alpha_grads"]),
                               rtol=1e-6, atol=0)
    assert r["hooks_added"] == [1, 1] and r["hooks_restored"]


@pytest.mark.slow
def test_refusals_name_the_flag(results):
    r = results["refusals"]
    for flag, value in [("cuda_graph_impl", "'local'"), ("cuda_graph_impl", "'transformer_engine'"),
                        ("enable_cuda_graph", "True"), ("external_cuda_graph", "True"),
                        ("overlap_moe_expert_parallel_comm", "True"), ("inference_fuse_tp_communication", "True")]:
        message = r[f"{flag}={value.strip(chr(39))}"]
        assert message and f"TransformerConfig.{flag}={value}" in message, (flag, message)
    assert "cross-attention" in r["cross_attention"]
    assert "IdentityFuncOp" in r["identity_bda"]
    assert "before wrapping" in r["ddp_wrapped"] and "before DistributedDataParallel" in r["ddp_inner"]
    assert "no megatron-core TransformerLayer" in r["no_layers"]
    assert all(v for k, v in r.items() if k.endswith("_untouched"))  # a refusal changes no layer
