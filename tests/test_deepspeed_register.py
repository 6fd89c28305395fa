"""register()/unregister(), config parsing and the clear errors of gradpower_ds.deepspeed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradpower_ds.deepspeed as gds
from conftest import torchrun

JOB = Path(__file__).parent / "jobs" / "ds_config_checks.py"


def test_import_patches_nothing():
    code = ("import gradpower_ds, deepspeed; from deepspeed.runtime import config; "
            "from deepspeed.runtime.zero import utils; from deepspeed.runtime.engine import DeepSpeedEngine; "
            "assert 'adampower' not in config.DEEPSPEED_OPTIMIZERS; "
            "assert not any('Power' in c.__name__ for c in utils.ZERO_SUPPORTED_OPTIMIZERS); "
            "assert DeepSpeedEngine._configure_basic_optimizer.__module__ == 'deepspeed.runtime.engine'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_register_is_idempotent_and_reversible():
    from deepspeed.runtime import config
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import utils
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = DeepSpeedEngine._configure_basic_optimizer
    original_load = Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3
    names, supported = list(config.DEEPSPEED_OPTIMIZERS), list(utils.ZERO_SUPPORTED_OPTIMIZERS)
    try:
        gds.register()
        gds.register()
        assert gds.is_registered()
        assert config.DEEPSPEED_OPTIMIZERS == names + ["adampower", "adamwpower", "muonpower"]
        assert len(utils.ZERO_SUPPORTED_OPTIMIZERS) == len(supported) + 2
        assert DeepSpeedEngine._configure_basic_optimizer is not original
        assert Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3 is not original_load
    finally:
        gds.unregister()
    gds.unregister()
    assert not gds.is_registered()
    assert config.DEEPSPEED_OPTIMIZERS == names and utils.ZERO_SUPPORTED_OPTIMIZERS == supported
    assert DeepSpeedEngine._configure_basic_optimizer is original
    assert Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3 is original_load


def test_unsupported_deepspeed_version_is_named(monkeypatch):
    import deepspeed

    for outside in ("0.15.4", "0.20.0"):
        monkeypatch.setattr(deepspeed, "__version__", outside)
        with pytest.raises(gds.UnsupportedDeepSpeedError, match=r"supports DeepSpeed 0\.16\.0 through 0\.19\.8 \(.*"
                           rf"{outside} is installed: pip install \"deepspeed>=0\.16\.0,<=0\.19\.8\""):
            gds.register()
        assert not gds.is_registered()


def test_optimizer_kwargs():
    kwargs, expert = gds.optimizer_kwargs("AdamWPower", {"lr": 3e-4, "power": 1.1, "expert_power": 1.3})
    assert kwargs == {"lr": 3e-4, "power": 1.1, "adam_w_mode": True} and expert == 1.3
    assert gds.optimizer_kwargs("adampower", None) == ({"power": 1.2}, None)  # AdamPower's default p, filled in
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_grad_norm', 'pwr'\].*accepted keys are"):
        gds.optimizer_kwargs("AdamPower", {"pwr": 1.2, "max_grad_norm": 1.0})
    with pytest.raises(ValueError, match=r"^DeepSpeed optimizer 'AdamPower' params: unknown key\(s\) \['muon_power'\]; "
                                         r"accepted keys are .*; muon_power was renamed power"):
        gds.optimizer_kwargs("AdamPower", {"muon_power": 0.9})
    with pytest.raises(ValueError, match=r"'AdamPower' params: unknown key\(s\) \['adam_power'\]"):
        gds.optimizer_kwargs("AdamPower", {"adam_power": 1.1})  # MuonPower's auxiliary Adam's p: not AdamPower's
    with pytest.raises(ValueError, match=r"^DeepSpeed optimizer 'AdamPower' params: invalid lr=-1: must be"):
        gds.optimizer_kwargs("AdamPower", {"lr": -1})
    with pytest.raises(ValueError, match="adam_w_mode"):
        gds.optimizer_kwargs("AdamWPower", {"adam_w_mode": False})
    with pytest.raises(ValueError, match="invalid expert_power=0:"):
        gds.optimizer_kwargs("AdamPower", {"expert_power": 0})


def test_build_optimizer_expert_power_on_moe_groups():
    def groups():  # as DeepSpeed's MoE grouping hands them over (torch fills in defaults in place)
        dense, expert = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
        return [{"params": [dense], "name": "dense"}, {"params": [expert], "moe": True, "name": "ep"}]

    opt = gds.build_optimizer("adampower", {"power": 1.2, "expert_power": 1.5}, groups(), use_cpu_kernel=True)
    assert type(opt).__name__ == "CPUAdamPower"
    assert [g["power"] for g in opt.param_groups] == [1.2, 1.5]
    opt = gds.build_optimizer("adampower", {"power": 1.1}, groups(), use_cpu_kernel=False)
    assert type(opt).__name__ == "AdamPower" and [g["power"] for g in opt.param_groups] == [1.1, 1.1]
    with pytest.raises(ValueError, match="power"):
        gds.build_optimizer("adampower", {"power": -1}, groups(), use_cpu_kernel=False)


def test_build_optimizer_fused_switch():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert gds.build_optimizer("adampower", {"fused": False}, params, use_cpu_kernel=False).fused is False
    assert type(gds.build_optimizer("adampower", {"fused": False}, params, use_cpu_kernel=True)).__name__ == \
        "CPUAdamPower"
    with pytest.raises(ValueError, match=r'"fused": true selects the GPU \(Triton\) kernel.*remove it'):
        gds.build_optimizer("adampower", {"fused": True}, params, use_cpu_kernel=True)


@pytest.fixture(scope="module")
def config_checks(tmp_path_factory):
    """The results of tests/jobs/ds_config_checks.py: one launch for every test that reads them."""
    out = tmp_path_factory.mktemp("ds_config_checks") / "checks.json"
    torchrun(JOB, out, nproc=1, timeout=900)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_deepspeed_initialize_with_adam_power_configs(config_checks):
    r = config_checks
    assert "AdamPower is not a supported DeepSpeed Optimizer" in r["unregistered"]["message"]
    assert "AdamPower is not a supported DeepSpeed Optimizer" in r["after_unregister"]["message"]
    assert r["lowercase"] == dict(optimizer="CPUAdamPower", power=1.2, adam_w_mode=True, weight_decay=0.1)
    assert r["uppercase_adamw"] == dict(optimizer="CPUAdamPower", power=1.1, adam_w_mode=True, weight_decay=0.0)
    assert r["l2_mode"]["adam_w_mode"] is False
    assert r["zero2"]["optimizer"] == r["zero3_offload"]["optimizer"] == "CPUAdamPower"
    assert r["unknown_key"]["error"] == "ValueError" and "['pwr']" in r["unknown_key"]["message"]
    assert "accepted keys are ['lr', 'betas'" in r["unknown_key"]["message"]
    assert r["bad_power"]["error"] == "ValueError" and "invalid power=0:" in r["bad_power"]["message"]
    assert r["bad_expert_power"]["error"] == "ValueError" and "expert_power" in r["bad_expert_power"]["message"]
    assert r["adamw_l2_conflict"]["error"] == "ValueError"
    if r["features"]["bf16_optimizer_states"]:  # at stage 0 DeepSpeed refuses it itself (stage 2: ours, below)
        assert "bf16_optimizer_states" in r["bf16_optimizer_states"]["message"]
    else:  # an older DeepSpeed ignores the key
        assert r["bf16_optimizer_states"]["optimizer"] == "CPUAdamPower"


def assert_refused_where_deepspeed_has_it(r: dict, check: str, feature: str, named: str) -> None:
    """Check `check` of the config-check job: refused by us, naming `named`, where this DeepSpeed has `feature`;
    where it lacks it (older DeepSpeed), DeepSpeed's config validation refuses the key or ignores it (ours built)."""
    if r["features"][feature]:
        assert r[check]["error"] == "ValueError", (check, r[check])
        assert r[check]["message"].startswith("DeepSpeed optimizer 'adampower': " + named) or \
            "cannot run with" in r[check]["message"] and named in r[check]["message"], (check, r[check]["message"])
    else:
        assert r[check].get("optimizer") == "CPUAdamPower" or (
            r[check]["error"] == "ValidationError" and "Extra inputs are not permitted" in r[check]["message"]), \
            (check, r[check])


class _Engine:
    """The engine methods _build_for_engine reads; only those of DeepSpeed's older API unless `settings` adds
    newer ones (e.g. bf16_optimizer_states=True: a method returning True, as DeepSpeed >= 0.18.3 has)."""

    global_rank = 0

    def __init__(self, stage=3, offload=True, **settings):
        self.stage, self.offload = stage, offload
        for method, value in settings.items():
            setattr(self, method, lambda value=value: value)

    def zero_optimization_stage(self):
        return self.stage

    def zero_use_cpu_optimizer(self):
        return self.offload

    def optimizer_params(self):
        return {"lr": 1e-3, "power": 1.1}


FEATURES = {  # engine settings of a DeepSpeed feature that steps only with DeepSpeed's own Adam -> the error
    "bf16_optimizer_states": (dict(bf16_optimizer_states=True),
                              r'"bf16": \{"bf16_optimizer_states": true\}.*fp32 moments'),
    "fp16_master_weights": (dict(fp16_master_weights_and_gradients=True),
                            r'"fp16": \{"fp16_master_weights_and_grads": true\}.*DeepSpeedCPUAdam.*"AdamW"'),
    "bf16_master_weights": (dict(bf16_master_weights_and_gradients=True),
                            r'"bf16": \{"bf16_master_weights_and_grads": true\}.*fp32 master weights'),
    "zenflow": (dict(zenflow_config=object()), r'ZenFlow \("zero_optimization": \{"zenflow".*remove "zenflow"'),
    "super_offload": (dict(super_offload=True), r'SuperOffload .*"super_offload": true.*remove "super_offload"'),
    "partial_offload": (dict(zero_partial_offload=0.25),
                        r'partial optimizer offload .*"ratio": 0\.25\}.*"ratio": 1\.0'),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_features_needing_deepspeeds_adam_are_refused(feature):
    settings, message = FEATURES[feature]
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"^DeepSpeed optimizer 'adampower': " + message):
        gds._build_for_engine(_Engine(**settings), "adampower", params)


def test_features_refused_all_at_once_and_only_where_deepspeed_uses_them():
    params = [torch.nn.Parameter(torch.zeros(3))]
    both = _Engine(bf16_optimizer_states=True, bf16_master_weights_and_gradients=True)
    with pytest.raises(ValueError, match=r"cannot run with 2 settings of this config:\n- .*bf16_optimizer_states.*"
                                         r"\n- .*bf16_master_weights_and_grads"):
        gds._build_for_engine(both, "adampower", params)
    # A DeepSpeed without the newer engine methods (bf16_optimizer_states() is 0.18.3's), features off, SuperOffload
    # below ZeRO-3 (DeepSpeed ignores it there), partial offload without offload, full offload: ours is built.
    for engine in (_Engine(), _Engine(bf16_optimizer_states=False, zenflow_config=None, zero_partial_offload=1.0),
                   _Engine(stage=2, super_offload=True), _Engine(offload=False, zero_partial_offload=0.5)):
        optimizer = gds._build_for_engine(engine, "adampower", params)
        assert type(optimizer).__name__ == "CPUAdamPower" and optimizer.param_groups[0]["power"] == 1.1


def test_universal_checkpoints_refused_before_deepspeed_0_18(monkeypatch):
    """DeepSpeed < 0.18.0 cannot convert (ZeRO-3, several sub-groups) or load (0.16.0, ZeRO-1/2) universal
    checkpoints correctly: loading one with AdamPower is refused there, naming the version that has it."""
    import deepspeed

    params = [torch.nn.Parameter(torch.zeros(3))]
    monkeypatch.setattr(deepspeed, "__version__", "0.17.6")
    with pytest.raises(ValueError, match=r'loading a universal checkpoint \("checkpoint": \{"load_universal": true\}\) '
                                         r"with AdamPower needs DeepSpeed 0\.18\.0 or newer \(this is 0\.17\.6.*"
                                         r"install deepspeed>=0\.18\.0, or resume from the regular checkpoint"):
        gds._build_for_engine(_Engine(load_universal_checkpoint=True), "adampower", params)
    assert type(gds._build_for_engine(_Engine(load_universal_checkpoint=False), "adampower", params)).__name__ \
        == "CPUAdamPower"
    monkeypatch.setattr(deepspeed, "__version__", "0.18.0")
    assert type(gds._build_for_engine(_Engine(load_universal_checkpoint=True), "adampower", params)).__name__ \
        == "CPUAdamPower"


@pytest.mark.slow
def test_deepspeed_initialize_refuses_features_needing_deepspeeds_adam(config_checks):
    """The same refusals from inside deepspeed.initialize, before DeepSpeed's own assert / TypeError (or, for
    ZenFlow with overlap_step, a run that ignores AdamPower's power)."""
    r = config_checks
    expected = {  # check -> (the feature as the job names it, what our error names)
        "partial_offload": ("partial_offload",
                            'partial optimizer offload ("zero_optimization": {"offload_optimizer": {"ratio": 0.5}})'),
        "super_offload": ("super_offload",
                          'SuperOffload ("zero_optimization": {"offload_optimizer": {"super_offload": true}})'),
        "zenflow": ("zenflow", 'ZenFlow ("zero_optimization": {"zenflow": ...})'),
        "zenflow_overlap_step": ("zenflow", 'ZenFlow ("zero_optimization": {"zenflow": ...})'),
        "bf16_master_weights": ("bf16_master_weights_and_gradients", '"bf16": {"bf16_master_weights_and_grads": true}'),
        "bf16_master_weights_zero3": ("bf16_master_weights_and_gradients",
                                      '"bf16": {"bf16_master_weights_and_grads": true}'),
        "fp16_master_weights": ("fp16_master_weights_and_gradients", '"fp16": {"fp16_master_weights_and_grads": true}'),
    }
    for check, (feature, named) in expected.items():
        assert_refused_where_deepspeed_has_it(r, check, feature, named)
        if r["features"][feature]:
            assert "or use DeepSpeed's \"type\": \"AdamW\"" in r[check]["message"], check
    if r["features"]["partial_offload"]:
        assert '"ratio": 1.0, CPUAdamPower on the CPU' in r["partial_offload"]["message"]
    states = r["bf16_optimizer_states_zero2"]
    if r["features"]["bf16_optimizer_states"] and r["features"]["bf16_master_weights_and_gradients"]:
        assert states["error"] == "ValueError" and "cannot run with 2 settings" in states["message"]
        assert '"bf16_optimizer_states": true' in states["message"]
    else:
        assert_refused_where_deepspeed_has_it(r, "bf16_optimizer_states_zero2", "bf16_master_weights_and_gradients",
                                              '"bf16": {"bf16_master_weights_and_grads": true}')
    assert r["full_offload_ratio"]["optimizer"] == "CPUAdamPower"
    if r["features"]["super_offload"]:
        assert r["super_offload_zero2"]["optimizer"] == "CPUAdamPower"
    if gds.DEEPSPEED.installed() == gds.DEEPSPEED.newest:  # the newest tested DeepSpeed has all: none goes untested
        assert all(r["features"].values()), r["features"]


GROUP_TIMEOUT = """
import datetime, os, sys, torch, deepspeed
import gradpower_ds.deepspeed as gds
if sys.argv[1] == "registered":
    gds.register()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=7))
group = deepspeed.comm.new_group([0])
print(group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
"""


@pytest.mark.parametrize("registered, seconds", [("registered", 7.0), ("not", 1800.0)])
def test_deepspeed_groups_keep_the_init_distributed_timeout(registered, seconds):
    """DeepSpeed alone gives its later groups torch's 30-minute default (a cut-off host then blocks an MoE
    collective for half an hour); registered, they get init_distributed's timeout."""
    from conftest import free_port

    proc = subprocess.run([sys.executable, "-c", GROUP_TIMEOUT, registered, str(free_port())], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert float(proc.stdout.split()[-1]) == seconds
