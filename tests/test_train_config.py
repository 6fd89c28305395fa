"""The main job's settings (issue 20): every setting checked before anything is launched or deepspeed imported,
each error one line naming the setting and its flag or file, exit status 2; --help from the fields; the effective
ZeRO stage; launch/quickstart.sh from another directory."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, launch_env
from gradpower_ds.jobs import train_config
from gradpower_ds.jobs.train_config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.json"


def write(path, text):
    path.write_text(text)
    return str(path)


# ---- the config file -----------------------------------------------------------------------------------------------

def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"--config .*nope\.json: file not found"):
        load_config(["--config", str(tmp_path / "nope.json")])


def test_broken_json_names_the_file_and_position(tmp_path):
    path = write(tmp_path / "broken.json", '{"steps": 5,}')
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON: .* at line 1 column 13"):
        load_config(["--config", path])
    path = write(tmp_path / "list.json", "[1, 2]")
    with pytest.raises(ValueError, match=rf"{path}: expected a JSON object"):
        load_config(["--config", path])


@pytest.mark.parametrize("text, message", [
    ('{"steps": "5"}', r"steps='5' must be an integer, not str"),
    ('{"power": "abc"}', r"power='abc' must be a finite number or null, not str"),
    ('{"gpas": "yes"}', r"gpas='yes' must be true or false, not str"),
    ('{"betas": [0.9]}', r"betas=\[0.9\] must be a list of 2 numbers"),
    ('{"lr": null}', r"lr=None must be a finite number, not NoneType"),
    ('{"deepspeed_overrides": [1]}', r"deepspeed_overrides=\[1\] must be a JSON object, not list"),
    ('{"data": 3}', r"data=3 must be a string, not int"),
])
def test_json_type_errors_name_key_type_and_file(tmp_path, text, message):
    path = write(tmp_path / "c.json", text)
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        load_config(["--config", path])


def test_json_numbers_become_floats(tmp_path):
    cfg = load_config(["--config", write(tmp_path / "c.json", '{"lr": 1, "betas": [0, 0.5], "expert_power": 2}')])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.betas == (0.0, 0.5) and cfg.expert_power == 2.0


# ---- AdamPower hyperparameters, as the optimizer checks them ----------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--betas", "1.0", "0.95"], r"^--betas: invalid betas\[0\]=1: must be a finite number in \[0, 1\)"),
    (["--betas", "0.9", "-0.1"], r"^--betas: invalid betas\[1\]=-0.1"),
    (["--weight_decay", "-1"], r"^--weight_decay: invalid weight_decay=-1: must be a finite number >= 0"),
    (["--eps=-1e-8"], r"^--eps: invalid eps=-1e-08: must be a finite number >= 0"),
    (["--expert_power", "0"], r"^--expert_power: invalid expert_power=0: must be a finite number > 0"),
    (["--deepspeed_overrides", '{"optimizer": {"params": {"betas": [0.9, 1.5]}}}'],
     r"^--deepspeed_overrides: invalid betas\[1\]=1.5"),
])
def test_optimizer_hyperparameters_checked_before_launch(flags, message):
    with pytest.raises(ValueError, match=message):
        load_config(["--config", str(QUICKSTART), *flags])


def test_power_with_adamw_is_refused_naming_both_flags(tmp_path):
    with pytest.raises(ValueError, match=r"^--power 1.5 has no effect unless --optimizer adampower or muonpower "
                                         r"\(optimizer is 'adamw', from --optimizer\)"):
        load_config(["--optimizer", "adamw", "--power", "1.5"])
    with pytest.raises(ValueError, match=r"^--expert_power 1.1 has no effect unless --optimizer adampower"):
        load_config(["--config", str(QUICKSTART), "--optimizer", "adamw", "--expert_power", "1.1"])
    path = write(tmp_path / "c.json", '{"optimizer": "adamw", "power": 1.5}')
    with pytest.raises(ValueError, match=rf"^{path} key power=1.5 has no effect unless --optimizer adampower"):
        load_config(["--config", path])
    with pytest.raises(ValueError, match=r"^--power 1.3 has no effect"):  # --optimizer adamw in the file
        load_config(["--config", write(tmp_path / "d.json", '{"optimizer": "adamw"}'), "--power", "1.3"])
    # the flag switches the optimizer: the file's power (the quickstart's 1.2) no longer applies, nothing refused
    cfg = load_config(["--config", str(QUICKSTART), "--optimizer", "adamw"])
    assert cfg.optimizer == "adamw" and "power" not in cfg.deepspeed_config()["optimizer"]["params"]


def test_muon_settings(tmp_path):
    cfg = load_config(["--config", str(QUICKSTART), "--optimizer", "muonpower", "--power", "0.9",
                       "--grad_clip", "0"])
    optimizer = cfg.deepspeed_config()["optimizer"]
    assert optimizer["type"] == "MuonPower"
    assert optimizer["params"] == dict(lr=cfg.lr, betas=list(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                       muon_lr=0.02, momentum=0.95, power=0.9, adam_power=1.2)
    assert (cfg.power, cfg.adam_power) == (0.9, 1.2) and cfg.optimizer_label() == "muonpower p=0.9 adam p=1.2"
    cfg = load_config(["--optimizer", "muonpower", "--power", "0.9", "--adam_power", "1", "--grad_clip", "0"])
    assert (cfg.deepspeed_config()["optimizer"]["params"]["adam_power"], cfg.optimizer_label()) == \
        (1.0, "muonpower p=0.9 adam p=1")
    muon = load_config(["--optimizer", "muon", "--muon_lr", "0.05", "--grad_clip", "0"]).deepspeed_config()["optimizer"]
    assert muon == dict(type="Muon", params=dict(lr=3e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, muon_lr=0.05,
                                                 momentum=0.95))
    with pytest.raises(ValueError, match=r"^--optimizer: muonpower needs power, MuonPower's p, applied before "
                                         r"Muon's momentum .*openai/parameter-golf PR #1682"):
        load_config(["--optimizer", "muonpower", "--grad_clip", "0"])
    with pytest.raises(ValueError, match=r"^--power: invalid power=0: must be a finite number > 0 "
                                         r"\(1.0 is plain Muon\)$"):
        load_config(["--optimizer", "muonpower", "--power", "0", "--grad_clip", "0"])
    with pytest.raises(ValueError, match=r"^--adam_power: invalid adam_power=-1: must be a finite number > 0 "
                                         r"\(1.0 is plain Adam"):
        load_config(["--optimizer", "muonpower", "--power", "1", "--adam_power", "-1", "--grad_clip", "0"])
    with pytest.raises(ValueError, match=r"^--power 0.9 has no effect unless --optimizer adampower or muonpower "
                                         r"\(optimizer is 'muon', from --optimizer\)"):
        load_config(["--optimizer", "muon", "--power", "0.9"])
    with pytest.raises(ValueError, match=r"^--adam_power 1.0 has no effect unless --optimizer muonpower \(optimizer "
                                         r"is 'adampower', from the default\)"):
        load_config(["--adam_power", "1"])
    with pytest.raises(ValueError, match=r"^--momentum 0.9 has no effect unless --optimizer muon or muonpower"):
        load_config(["--optimizer", "adamw", "--momentum", "0.9"])
    with pytest.raises(ValueError, match=r"^--momentum: momentum=1.0 must be in \[0, 1\)"):
        load_config(["--optimizer", "muon", "--momentum", "1"])
    # DeepSpeed's ZeRO would clip Muon's orthogonalised update: refused, saying what to set
    with pytest.raises(ValueError, match=rf"^{QUICKSTART}, --optimizer: grad_clip=1 with optimizer muonpower under "
                                         r"ZeRO-2: under ZeRO, DeepSpeed's gradient_clipping clips Muon's "
                                         r"orthogonalised update, .*set grad_clip 0$"):
        load_config(["--config", str(QUICKSTART), "--optimizer", "muonpower", "--power", "0.9"])
    assert load_config(["--optimizer", "muon", "--zero_stage", "0"]).grad_clip == 1.0  # stage 0 clips gradients
    # the stage of the final DeepSpeed config counts, also when only deepspeed_overrides sets it
    with pytest.raises(ValueError, match=r"grad_clip=1 with optimizer muon under ZeRO-1: .*set grad_clip 0$"):
        load_config(["--optimizer", "muon", "--zero_stage", "0", "--deepspeed_overrides",
                     '{"zero_optimization": {"stage": 1}}'])


# ---- the final DeepSpeed config -----------------------------------------------------------------------------------------

def test_effective_zero_stage_comes_from_the_final_deepspeed_config():
    stage3 = '{"zero_optimization": {"stage": 3}}'
    cfg = load_config(["--num_experts", "0", "--deepspeed_overrides", stage3])
    assert cfg.zero_stage == 2 and cfg.effective_zero_stage == 3
    assert load_config(["--deepspeed_overrides", '{"zero_optimization": {"stage": 1}}']).effective_zero_stage == 1
    assert TrainConfig().effective_zero_stage == 2
    with pytest.raises(ValueError, match=r"--deepspeed_overrides: num_experts=4 > 0 needs zero_stage 1 or 2 .*"
                                         r"stage 3 \(set by deepspeed_overrides\)"):
        load_config(["--config", str(QUICKSTART), "--deepspeed_overrides", stage3])
    with pytest.raises(ValueError, match=r"zero_optimization.stage='x' must be 0, 1, 2 or 3"):
        load_config(["--deepspeed_overrides", '{"zero_optimization": {"stage": "x"}}'])


@pytest.mark.parametrize("override, message", [
    ('{"train_micro_batch_size_per_gpu": 4}', r"sets train_micro_batch_size_per_gpu=4, .* set micro_batch instead"),
    ('{"gradient_accumulation_steps": 2}', r"set grad_accum instead"),
    ('{"train_batch_size": 64}', r"sets train_batch_size"),
    ('{"optimizer": {"type": "Adam"}}', r"sets optimizer.type='Adam'; set optimizer"),
])
def test_overrides_of_what_the_loop_relies_on_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(["--deepspeed_overrides", override])


def test_start_line_uses_the_effective_stage():
    """gradpower_ds.jobs.train's start line formats the stage of the final DeepSpeed config."""
    source = (ROOT / "gradpower_ds" / "jobs" / "train.py").read_text()
    assert "cfg.effective_zero_stage" in source and "ZeRO-%d" in source


# ---- paths, placement, run_dir ------------------------------------------------------------------------------------------

def test_missing_data_and_tokenizer_paths_are_refused_early(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"^--data: data path not found: missing.txt \(from {tmp_path}\)"):
        load_config(["--data", "missing.txt"])
    path = write(tmp_path / "c.json", '{"data": "nothing/*.txt"}')
    with pytest.raises(ValueError, match=rf"^{path}: data path not found: nothing/\*.txt"):
        load_config(["--config", path])
    with pytest.raises(ValueError, match=r"^--tokenizer: tokenizer path not found: tok"):
        load_config(["--tokenizer", "tok"])
    (tmp_path / "corpus.txt").write_text("a\n\nb\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.txt").write_text("x")
    for data in ("corpus.txt", "docs", "docs/*.txt", "stdlib"):
        assert load_config(["--data", data]).data == data


def test_experts_placed_on_the_ranks_before_launch(monkeypatch):
    with pytest.raises(ValueError, match=r"^--ep_size: ep_size=4 cannot be placed: .*\(2 ranks\)"):
        load_config(["--ep_size", "4"], world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"ep_size=4 cannot be placed"):
        load_config(["--ep_size", "4"])
    with pytest.raises(ValueError, match=r"^--dim: dim=30 must be divisible by n_heads=4"):
        load_config(["--dim", "30"])
    with pytest.raises(ValueError, match=r"^--dim, --n_heads: dim=32 must be divisible by n_heads=3"):
        load_config(["--dim", "32", "--n_heads", "3"])


def _main_error(argv, capsys):
    from gradpower_ds.jobs.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_train_main_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    used = tmp_path / "used"
    used.mkdir()
    (used / "status.json").write_text(json.dumps({"state": "complete"}))
    err = _main_error(["--config", str(QUICKSTART), "--run_dir", str(used)], capsys)
    assert f"run_dir {used} already holds a run (state: complete); pass --resume true" in err
    err = _main_error(["--config", str(tmp_path / "nope.json")], capsys)
    assert "nope.json: file not found" in err
    err = _main_error(["--config", write(tmp_path / "c.json", '{"steps": "5"}')], capsys)
    assert "c.json: steps='5' must be an integer" in err
    err = _main_error(["--steps", "x"], capsys)  # argparse: one line, not the usage of 45 flags
    assert err.startswith("python -m gradpower_ds train: error: argument --steps: expected an integer, got 'x'")
    err = _main_error(["--config", str(QUICKSTART), "--betas", "1.0", "0.95"], capsys)
    assert err.startswith("gradpower_ds.jobs.train: error: --betas: invalid betas[0]=1:")


def test_validation_imports_no_deepspeed(tmp_path):
    """Every refusal comes before deepspeed is imported (so in a second or two, not after DeepSpeed's start)."""
    code = f"""
import sys
from gradpower_ds.jobs.train import main
for argv in (["--data", "missing.txt"], ["--betas", "1.0", "0.95"], ["--optimizer", "adamw", "--power", "1.5"],
             ["--deepspeed_overrides", '{{"zero_optimization": {{"stage": 3}}}}'], ["--run_dir", {str(tmp_path)!r}]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 2, e.code
    else:
        raise AssertionError(argv)
print("deepspeed imported:", "deepspeed" in sys.modules)
"""
    (tmp_path / "x").write_text("")  # a used run_dir
    env = {k: v for k, v in launch_env().items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed imported: False" in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 5, proc.stderr


def test_other_local_ranks_wait_then_report(monkeypatch, capsys):
    monkeypatch.setattr(train_config, "ERROR_GRACE_S", 0.0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    train_config.report_error("x=1 is bad")
    assert capsys.readouterr().err == "gradpower_ds.jobs.train: error: x=1 is bad\n"


# ---- the model settings and the field types ---------------------------------------------------------------------------

MODEL_SETTINGS = ["dim", "n_layers", "n_heads", "ffn_dim", "num_experts", "top_k", "norm", "gpas", "gpas_act"]


def test_model_settings_are_model_config_fields():
    """Their defaults, help texts and types are ModelConfig's; model_config() passes them on by name."""
    import dataclasses
    import typing

    from gradpower_ds.jobs.model import ModelConfig

    model_fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    shared = [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("model")]
    assert [f.name for f in shared] == MODEL_SETTINGS
    train_types, model_types = typing.get_type_hints(TrainConfig), typing.get_type_hints(ModelConfig)
    for f in shared:
        assert f.default == model_fields[f.name].default, f.name
        assert f.metadata["help"] == model_fields[f.name].metadata["help"], f.name
        assert train_types[f.name] is model_types[f.name], f.name
    # the main job's model is ModelConfig's default one (sized to the data)
    assert TrainConfig().model_config(257, 1) == ModelConfig(vocab_size=257, max_seq_len=128)
    cfg = TrainConfig(dim=64, num_experts=2, top_k=1, norm="lns", gpas=True, gpas_act="tanh", seq_len=32)
    model = cfg.model_config(vocab_size=257, world_size=4)
    assert all(getattr(model, name) == getattr(cfg, name) for name in MODEL_SETTINGS)
    assert (model.vocab_size, model.max_seq_len) == (257, 32)
    # ep_size: the job's (0 = automatic placement) is resolved into the model's (the size)
    assert cfg.ep_size == 0 and model.ep_size == 2 and ModelConfig().ep_size == 1
    assert TrainConfig(num_experts=0).model_config(257, 4).ep_size == 1


def test_field_types_are_real_types():
    """The type checks and flag parsers are keyed by the fields' evaluated annotations, not their strings."""
    types = train_config._TYPES
    assert types["steps"] is int and types["expert_power"] == (float | None) and types["betas"] == tuple[float, float]
    assert set(types.values()) <= set(train_config._EXPECTED) == set(train_config._FLAG_TYPES)


# ---- --help ---------------------------------------------------------------------------------------------------------

def test_every_flag_has_help_text_and_default(capsys, monkeypatch):
    import dataclasses

    monkeypatch.setenv("COLUMNS", "200")
    parser = train_config.argument_parser()
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest not in ("help",
                                                                                                     "local_rank")}
    fields = dataclasses.fields(TrainConfig)
    assert set(flags) == {"--config"} | {f"--{f.name}" for f in fields} | {"--muon_power"}  # renamed: refused
    assert flags["--muon_power"].help == argparse.SUPPRESS
    for f in fields:
        assert f.metadata.get("help"), f.name  # the one place the help text lives
        text = flags[f"--{f.name}"].help
        assert text and "(default: " in text, f.name
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--betas B1 B2" in out and "(default: 0.9 0.95)" in out and "(default: adampower)" in out


# ---- launch/quickstart.sh ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_quickstart_from_another_directory_resolves_paths_there(tmp_path):
    """CONFIG, the data path in it and run_dir relative to where the script was started; on 2 ranks a bad setting
    (here: a used run_dir without --resume) ends in seconds with one line and exit status 2."""
    (tmp_path / "corpus.txt").write_text("first document\n\nsecond document\n")
    (tmp_path / "mycfg.json").write_text(json.dumps({"data": "corpus.txt", "run_dir": "used", "steps": 8,
                                                     "warmup_steps": 2}))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "status.json").write_text(json.dumps({"state": "complete"}))
    env = launch_env(NUM_GPUS="2", MASTER_PORT=str(free_port()), CONFIG="mycfg.json")
    began = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "launch" / "quickstart.sh")], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    seconds = time.perf_counter() - began
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["gradpower_ds.jobs.train: error: run_dir used already holds a run (state: complete); pass --resume "
                      "true to continue it, or choose another --run_dir"], proc.stderr
    assert seconds < 60
    assert not (ROOT / "used").exists()


def test_an_old_name_of_p_is_refused_naming_the_new_ones(tmp_path, capsys):
    """muon_power (MuonPower's p before Muon's momentum) is now power, and the auxiliary Adam's p adam_power: the old
    name is refused, on the command line and in a file, never read with another meaning."""
    with pytest.raises(SystemExit) as exit_:
        load_config(["--optimizer", "muonpower", "--muon_power", "0.9"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: --muon_power: muon_power was renamed power (with optimizer muonpower, power is MuonPower's p before" \
           " Muon's momentum" in err and "is adam_power" in err
    path = write(tmp_path / "old.json", '{"optimizer": "muonpower", "muon_power": 0.9, "power": 1.2}')
    with pytest.raises(ValueError, match=rf"^--config {path}: unknown key\(s\) \['muon_power'\]; accepted keys are .*; "
                                         r"muon_power was renamed power .* is adam_power$"):
        load_config(["--config", path])


def test_a_files_p_is_its_optimizers(tmp_path):
    """power is the p of the optimizer named: a file's power (its optimizer's p) does not carry over when a flag
    switches the optimizer, so muonpower, which has no default p, asks for one instead of running at AdamPower's."""
    with pytest.raises(ValueError, match=r"^--optimizer: muonpower needs power"):
        load_config(["--config", str(QUICKSTART), "--optimizer", "muonpower", "--grad_clip", "0"])
    path = write(tmp_path / "muon.json", '{"optimizer": "muonpower", "power": 0.9, "grad_clip": 0}')
    assert load_config(["--config", path]).power == 0.9  # the file's own optimizer: kept
    assert load_config(["--config", path, "--optimizer", "muonpower"]).power == 0.9  # the same optimizer again
    assert load_config(["--config", path, "--optimizer", "adampower"]).power == 1.2  # switched: AdamPower's default


@pytest.mark.parametrize("value", ["0", "-5"])
def test_dist_timeout_must_be_positive_seconds(value):
    with pytest.raises(ValueError, match=r"dist_timeout=.* must be a finite number of seconds > 0"):
        load_config(["--config", str(QUICKSTART), "--dist_timeout", value])
    assert load_config(["--config", str(QUICKSTART), "--dist_timeout", "20"]).dist_timeout == 20.0
