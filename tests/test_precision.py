"""precision "auto": bf16 where the machine computes it natively (GPUs, CPUs with AVX512_BF16 or AMX), else fp32;
an explicit bf16 on a CPU that emulates it is honoured with a warning. The machine is given, so every branch runs
on any CPU (this suite must not depend on the machine having fast bf16)."""

import pytest

from gradpower_ds.jobs.precision import PRECISIONS, native_bf16_features, resolve_precision, slow_bf16_warning
from gradpower_ds.jobs.train_config import TrainConfig

AVX2_ONLY = {"avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}  # e.g. AMD EPYC Zen 3
AVX512_BF16 = {"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": False}  # e.g. AMD EPYC Zen 4
AMX = {"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}  # e.g. Intel Sapphire Rapids


@pytest.mark.parametrize("cuda, caps, want", [(True, AVX2_ONLY, "bf16"), (False, AVX512_BF16, "bf16"),
                                              (False, AMX, "bf16"), (False, AVX2_ONLY, "fp32"), (False, {}, "fp32")])
def test_auto_picks_bf16_only_where_it_is_native(cuda, caps, want):
    precision, why = resolve_precision("auto", cuda=cuda, capabilities=caps)
    assert precision == want and why.startswith("auto: ")
    if want == "fp32":
        assert "no native bf16" in why
    elif not cuda:
        assert native_bf16_features(caps)[0] in why


@pytest.mark.parametrize("requested", [p for p in PRECISIONS if p != "auto"])
def test_an_explicit_precision_is_honoured(requested):
    assert resolve_precision(requested, cuda=False, capabilities=AVX2_ONLY) == (requested, "as configured")


def test_bf16_on_a_cpu_that_emulates_it_warns_and_says_what_to_set():
    warning = slow_bf16_warning("bf16", cuda=False, capabilities=AVX2_ONLY)
    assert "without native bf16" in warning and "about 50x slower than fp32" in warning
    assert "Set precision to auto (the default) or fp32" in warning
    for precision, cuda, caps in [("bf16", True, AVX2_ONLY), ("bf16", False, AVX512_BF16), ("fp32", False, AVX2_ONLY),
                                  ("fp16", False, AVX2_ONLY)]:
        assert slow_bf16_warning(precision, cuda=cuda, capabilities=caps) is None


def test_auto_is_the_default_and_drives_the_deepspeed_config():
    cfg = TrainConfig()
    assert cfg.precision == "auto" and cfg.effective_precision == resolve_precision("auto")[0]
    ds = cfg.deepspeed_config()
    assert ds["bf16"]["enabled"] is (cfg.effective_precision == "bf16") and not ds["fp16"]["enabled"]
    assert TrainConfig(precision="fp32").deepspeed_config()["bf16"]["enabled"] is False
