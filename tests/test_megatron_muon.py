"""megatron_patches: ``OptimizerConfig(optimizer="muonpower")`` in megatron-core's get_megatron_muon_optimizer.

Cheap (in-process): the config fields (gradpower_p required, with the reason there is no
default; expert and Adam p; each bad value named) and the refusals where megatron-core's Muon
is missing (megatron-core before 0.16, or without NVIDIA's emerging-optimizers).

Slow (one 2-rank launch, tests/jobs/megatron_muon.py, ~10 s): the tiny MoE GPTModel (EP=2)
under megatron DDP, fp32 and bf16, 3 clipped steps of Megatron's Muon with phi, against an
independent reference (see the job's docstring), and p = 1 against Megatron's own Muon.
"""

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

from megatron.core.optimizer import OptimizerConfig  # noqa: E402

import megatron_patches  # noqa: E402
from conftest import torchrun  # noqa: E402
from megatron_patches.optimizer import MUON_MODULES, config_powers, muon_module  # noqa: E402

JOBS = Path(__file__).parent / "jobs"


def _megatron_muon():
    """The module of megatron-core's TensorParallelMuon: .muon in 0.16 and 0.17, .emerging_optimizers from 0.18."""
    return muon_module()


@pytest.fixture
def applied():
    megatron_patches.apply()
    yield
    megatron_patches.remove()


@pytest.fixture
def muon_available(monkeypatch):
    """Megatron's Muon module, reporting emerging-optimizers present (only configs are built here, and this
    process has not backfilled typing.override, which emerging-optimizers 0.3.0 needs on Python 3.11)."""
    muon = _megatron_muon()
    if muon is None:
        pytest.skip("this megatron-core has no Muon (0.16 on)")
    monkeypatch.setattr(muon, "HAVE_EMERGING_OPTIMIZERS", True)
    return muon


def test_config_fields(applied, muon_available):
    config = OptimizerConfig(optimizer="muonpower", gradpower_p=0.9, lr=1e-3)
    assert config.optimizer == "muonpower" and config_powers(config) == dict(power=0.9, adam_power=1.2,
                                                                             expert_power=0.9)
    config = OptimizerConfig(optimizer="muonpower", gradpower_p=0.9, gradpower_p_expert=0.8, gradpower_p_adam=1.0)
    assert config_powers(config) == dict(power=0.9, adam_power=1.0, expert_power=0.8)


def test_power_is_required_with_the_reason(applied, muon_available):
    with pytest.raises(ValueError, match=r"optimizer='muonpower'\): muonpower needs gradpower_p, MuonPower's p.*"
                                         r"parameter-golf"):
        OptimizerConfig(optimizer="muonpower")


@pytest.mark.parametrize("field, value, error", [("gradpower_p", 0.0, ValueError), ("gradpower_p", -0.9, ValueError),
                                                  ("gradpower_p_expert", float("inf"), ValueError),
                                                  ("gradpower_p_adam", 0, ValueError),
                                                  ("gradpower_p_adam", "1.2", TypeError)])
def test_invalid_power_names_the_field(applied, muon_available, field, value, error):
    fields = {"gradpower_p": 0.9, field: value}
    with pytest.raises(error, match=rf"^OptimizerConfig\(optimizer='muonpower'\): invalid {field}="):
        OptimizerConfig(optimizer="muonpower", **fields)


def test_refused_without_emerging_optimizers(applied, monkeypatch):
    muon = _megatron_muon()
    if muon is None:
        pytest.skip("this megatron-core has no Muon (0.16 on)")
    monkeypatch.setattr(muon, "HAVE_EMERGING_OPTIMIZERS", False)
    with pytest.raises(RuntimeError, match="needs NVIDIA's emerging-optimizers.*pip install emerging-optimizers"):
        OptimizerConfig(optimizer="muonpower", gradpower_p=0.9)


def test_refused_on_a_megatron_core_without_muon(applied, monkeypatch):
    """megatron-core 0.13 (the oldest tested) has no Muon: the error names the version to install."""
    if _megatron_muon() is not None:
        real = importlib.import_module

        def import_module(name, *args):
            if name in MUON_MODULES:
                raise ImportError(name)
            return real(name, *args)

        monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(RuntimeError, match=r"needs megatron-core's Muon .*lacks: pip install 'megatron-core>=0\.16'"):
        OptimizerConfig(optimizer="muonpower", gradpower_p=0.9)


@pytest.mark.slow
def test_megatron_moe_muonpower_matches_reference(tmp_path):
    """2 ranks, EP=2, fp32 and bf16: Megatron's Muon with phi equals the reference after 3 clipped steps; p = 1 is
    Megatron's Muon bit for bit."""
    if _megatron_muon() is None or importlib.util.find_spec("emerging_optimizers") is None:
        pytest.skip("needs megatron-core's Muon (0.16 on) and emerging-optimizers (tests/run.sh installs them)")
    out = tmp_path / "results.json"
    torchrun(JOBS / "megatron_muon.py", out, timeout=600)
    results = json.loads(out.read_text())
    powered = {"muonpower": ((0.8, 1.3), (1.5, 1.5)), "muonpower_p1": ((1.0, 1.0), (1.0, 1.0))}
    for dtype in ("fp32", "bf16"):
        for variant in ("muon", "muonpower", "muonpower_p1"):
            case = results[f"{dtype}_{variant}"]
            # Megatron's chain: dense Muon, expert Muon, Adam; ours keeps it and moves each to its power class
            muon_powers_, adam_powers = powered.get(variant, (None, None))
            expected = [("TensorParallelMuon", muon_powers_)] * 2 + [("AdamW", adam_powers)]
            assert [(h["cls"].removesuffix("Power"), h["powers"] and tuple(h["powers"])) for h in case["inners"]] \
                == expected, (dtype, variant)
            if variant != "muon":  # ours keeps its name (megatron-core 0.16/0.17 rename their own 'muon' to 'adam')
                assert case["config_optimizer"] == "muonpower"
            assert case["counts"] == {"muon": 22, "adam": 12}
            errors = case["errors"]
            # fp32: measured 1.6e-7; bf16: 2.4e-4, a bf16 rounding step of weights up to ~0.1
            assert max(errors["right"].values()) <= (1e-6 if dtype == "fp32" else 1e-3), (dtype, variant, errors)
            if variant == "muonpower":  # told apart from p = 1 and from the dense and expert p swapped
                assert min(errors["p1"].values()) > 1e-2 and errors["swapped"]["muon"] > 1e-2, (dtype, errors)
    assert results["fp32_p1_vs_muon"] == 0.0 and results["bf16_p1_vs_muon"] == 0.0
