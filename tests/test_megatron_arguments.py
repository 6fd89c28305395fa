"""megatron_patches.arguments and megatron_patches.pretrain_gpt: flags, --gradpower-config, the entry point.

Megatron-LM is not installed here: its ``megatron.training`` modules are played
by small stand-ins (in sys.modules, or as files in a fake checkout run in a
subprocess) that do what Megatron-LM core_v0.16.1 does at the points patched:
``_add_training_args`` defines ``--optimizer`` with fixed choices,
``parse_args(extra_args_provider, ignore_unknown_args)`` builds a fresh parser,
``get_megatron_optimizer_config(args)`` copies dataclass fields and knows
'adam', 'sgd' and any name holding 'muon', ``training`` holds the name
``get_megatron_muon_optimizer`` imported from megatron-core (where it has Muon), and
``pretrain(..., extra_args_provider=...)`` parses twice (the second time without the provider,
as fault-tolerance setup does).
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from conftest import free_port

from megatron_patches import arguments
from megatron_patches.arguments import add_arguments, optimizer_config_kwargs

ROOT = Path(__file__).resolve().parent.parent


def megatron_like_parser(choices=("adam", "sgd")):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--optimizer", type=str, default="adam", choices=list(choices))
    parser.add_argument("--lr", type=float, default=None)
    return add_arguments(parser)


def write_config(tmp_path, values, name="gp.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return str(path)


def parse_error(parser, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_defaults_and_flags():
    args = megatron_like_parser().parse_args([])
    assert (args.optimizer, args.gradpower_p, args.gradpower_p_expert, args.gradpower_p_adam) == \
        ("adam", None, None, None)
    assert megatron_like_parser().parse_args(["--optimizer", "adampower"]).gradpower_p == 1.2  # AdamPower's default
    assert (args.gpas, args.gpas_act, args.gradpower_config) == (False, "silu", None)
    args = megatron_like_parser().parse_args(["--optimizer", "adampower", "--gradpower-p", "1.3",
                                              "--gradpower-p-expert", "0.9", "--gpas",
                                              "--gpas-act", "tanh", "--lr", "1e-3"])
    assert (args.optimizer, args.gradpower_p, args.gradpower_p_expert) == ("adampower", 1.3, 0.9)
    assert (args.gpas, args.gpas_act, args.lr) == (True, "tanh", 1e-3)
    assert optimizer_config_kwargs(args) == {"optimizer": "adampower", "gradpower_p": 1.3, "gradpower_p_expert": 0.9,
                                             "gradpower_p_adam": None}
    assert optimizer_config_kwargs(megatron_like_parser().parse_args([])) == {"optimizer": "adam"}


def test_parser_without_optimizer_gets_one_and_add_arguments_is_idempotent():
    parser = add_arguments(add_arguments(argparse.ArgumentParser()))
    assert parser.parse_args(["--optimizer", "adampower"]).optimizer == "adampower"
    assert sum("--gradpower-p" in a.option_strings for a in parser._actions) == 1


def test_config_file_fills_what_the_command_line_does_not_give(tmp_path):
    path = write_config(tmp_path, {"optimizer": "adampower", "gradpower_p": 1.4, "gradpower_p_expert": 1.1,
                                   "gpas": True, "gpas_act": "sigmoid", "_comment": "ignored"})
    args = megatron_like_parser().parse_args(["--gradpower-config", path])
    assert (args.optimizer, args.gradpower_p, args.gradpower_p_expert) == ("adampower", 1.4, 1.1)
    assert (args.gpas, args.gpas_act) == (True, "sigmoid")


@pytest.mark.parametrize("flags_first", [True, False])
def test_command_line_flags_win_over_the_file_in_either_order(tmp_path, flags_first):
    path = write_config(tmp_path, {"optimizer": "adampower", "gradpower_p": 1.4, "gradpower_p_expert": 1.1,
                                   "gpas": True, "gpas_act": "sigmoid"})
    # --gradpower-p 1.2 equals the default: "given" is detected, not guessed from the value
    flags = ["--gradpower-p", "1.2", "--gpas-act", "relu"]
    argv = flags + ["--gradpower-config", path] if flags_first else ["--gradpower-config", path] + flags
    args = megatron_like_parser().parse_args(argv)
    assert (args.gradpower_p, args.gpas_act) == (1.2, "relu")  # flags
    assert (args.optimizer, args.gradpower_p_expert, args.gpas) == ("adampower", 1.1, True)  # file
    # the parser's defaults are restored after the parse (a second parse sees them)
    again = megatron_like_parser()
    again.parse_args(argv)
    assert again.parse_args(["--optimizer", "adampower"]).gradpower_p == 1.2


def test_explicit_optimizer_adam_beats_the_file(tmp_path, capsys):
    path = write_config(tmp_path, {"optimizer": "adampower"})
    parser = megatron_like_parser()
    assert parser.parse_args(["--gradpower-config", path]).optimizer == "adampower"
    assert parser.parse_args(["--gradpower-config", path, "--optimizer", "adam"]).optimizer == "adam"


def test_unknown_json_key_is_named_with_the_accepted_ones(tmp_path, capsys):
    path = write_config(tmp_path, {"gradpower_p": 1.2, "gradpwer_p_expert": 1.0, "lr": 1.0})
    err = parse_error(megatron_like_parser(), ["--gradpower-config", path], capsys)
    assert "unknown key(s) ['gradpwer_p_expert', 'lr']" in err and path in err
    assert ("accepted keys are ['blockwise_lr', 'gpas', 'gpas_act', 'gradpower_p', 'gradpower_p_adam', "
            "'gradpower_p_expert', 'optimizer']") in err


@pytest.mark.parametrize("argv, named", [
    (["--gradpower-p", "0"], "error: invalid --gradpower-p=0: must be a finite number > 0 (1.0 is plain Adam"),
    (["--gradpower-p", "-1.2"], "error: invalid --gradpower-p=-1.2: must be a finite number > 0"),
    (["--gradpower-p", "nan"], "argument --gradpower-p: expected a finite number > 0, got 'nan'"),
    (["--gradpower-p", "x"], "argument --gradpower-p: expected a finite number > 0, got 'x'"),
    (["--gradpower-p-expert", "0"], "error: invalid --gradpower-p-expert=0: must be a finite number > 0"),
    (["--gpas-act", "gelu"], "argument --gpas-act: invalid choice: 'gelu'"),
    (["--gpas-variant", "post_ln"], "unrecognized arguments: --gpas-variant post_ln"),
    (["--optimizer", "adamw"], "argument --optimizer: invalid choice: 'adamw'"),
])
def test_bad_flags_are_named(argv, named, capsys):
    assert named in parse_error(megatron_like_parser(), ["--optimizer", "adampower", *argv], capsys)


@pytest.mark.parametrize("values, named", [
    ({"gradpower_p": 0}, "invalid --gradpower-config key gradpower_p=0: must be a finite number > 0"),
    ({"gradpower_p": -1.0}, "invalid --gradpower-config key gradpower_p=-1: must be a finite number > 0"),
    ({"gradpower_p": "1.2"}, "invalid --gradpower-config key gradpower_p='1.2': must be a finite number > 0"),
    ({"gradpower_p": True}, "invalid --gradpower-config key gradpower_p=True"),
    ({"gradpower_p_expert": 0.0}, "invalid --gradpower-config key gradpower_p_expert=0:"),
    ({"gpas": "yes"}, "key gpas='yes': must be true or false"),
    ({"gpas": True, "gpas_act": "gelu"}, "key gpas_act='gelu' is unknown; choose one of"),
    ({"gpas": True, "gpas_variant": "pre_ln"}, "unknown key(s) ['gpas_variant']"),
    ({"optimizer": "adamw"}, "key optimizer='adamw' is unknown; choose one of ['adam', 'sgd', 'adampower', 'muonpower']"),
])
def test_bad_file_values_are_named(tmp_path, values, named, capsys):
    path = write_config(tmp_path, {"optimizer": "adampower", **values})
    err = parse_error(megatron_like_parser(), ["--gradpower-config", path], capsys)
    assert named in err and (f"--gradpower-config {path}" in err or "gradpower_p" in named)


def test_unreadable_config_file(tmp_path, capsys):
    missing = str(tmp_path / "no.json")
    assert f"--gradpower-config {missing}: file not found" in parse_error(megatron_like_parser(),
                                                                          ["--gradpower-config", missing], capsys)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert "expected a JSON object {\"key\": value, ...}, got list" in parse_error(
        megatron_like_parser(), ["--gradpower-config", str(bad)], capsys)
    bad.write_text("{1")
    assert f"--gradpower-config {bad}: not valid JSON" in parse_error(megatron_like_parser(),
                                                                     ["--gradpower-config", str(bad)], capsys)


def test_settings_without_effect_are_refused(tmp_path, capsys):
    err = parse_error(megatron_like_parser(), ["--gradpower-p", "1.3"], capsys)
    assert "--gradpower-p has no effect unless --optimizer adampower or muonpower (optimizer is 'adam')" in err
    path = write_config(tmp_path, {"gradpower_p_expert": 1.3})
    err = parse_error(megatron_like_parser(), ["--gradpower-config", path], capsys)
    assert "--gradpower-config key gradpower_p_expert has no effect unless --optimizer adampower" in err
    assert "--gpas-act has no effect without --gpas" in parse_error(megatron_like_parser(), ["--gpas-act", "tanh"],
                                                                    capsys)
    # a file's gpas: true is enough for a command-line --gpas-act
    path = write_config(tmp_path, {"gpas": True}, "gpas.json")
    assert megatron_like_parser().parse_args(["--gradpower-config", path, "--gpas-act", "tanh"]).gpas_act == "tanh"


def test_muonpower_flags_and_file(tmp_path, capsys):
    """--optimizer muonpower: --gradpower-p is required (with the reason there is no default), the Adam p defaults
    to AdamPower's; --gradpower-p-adam is muonpower's alone; the JSON file can carry all of it."""
    parser = megatron_like_parser(("adam", "sgd", "muon"))
    args = parser.parse_args(["--optimizer", "muonpower", "--gradpower-p", "0.9"])
    assert optimizer_config_kwargs(args) == {"optimizer": "muonpower", "gradpower_p": 0.9, "gradpower_p_expert": None,
                                             "gradpower_p_adam": None}
    err = parse_error(parser, ["--optimizer", "muonpower"], capsys)
    assert "muonpower needs --gradpower-p, MuonPower's p, applied before Muon's momentum" in err and \
        "parameter-golf" in err
    err = parse_error(parser, ["--optimizer", "adampower", "--gradpower-p-adam", "1.1"], capsys)
    assert "--gradpower-p-adam has no effect unless --optimizer muonpower (optimizer is 'adampower')" in err
    assert "must be a finite number > 0" in parse_error(parser, ["--optimizer", "muonpower", "--gradpower-p", "0"],
                                                        capsys)
    path = write_config(tmp_path, {"optimizer": "muonpower", "gradpower_p": 0.85, "gradpower_p_adam": 1.3})
    args = parser.parse_args(["--gradpower-config", path, "--gradpower-p-expert", "0.95"])
    assert (args.optimizer, args.gradpower_p, args.gradpower_p_expert, args.gradpower_p_adam) == \
        ("muonpower", 0.85, 0.95, 1.3)
    path = write_config(tmp_path, {"optimizer": "muonpower", "gradpower_p_adam": -1}, "bad.json")
    assert "gradpower_p_adam" in parse_error(parser, ["--gradpower-config", path], capsys)


def test_parse_known_args_resolves_too(tmp_path):
    path = write_config(tmp_path, {"optimizer": "adampower", "gradpower_p": 1.5})
    args, extras = megatron_like_parser().parse_known_args(["--gradpower-config", path, "--unknown", "1"])
    assert (args.optimizer, args.gradpower_p, extras) == ("adampower", 1.5, ["--unknown", "1"])


# --- the Megatron-LM patches, against stand-in modules -------------------------------------------------------------

def _fake_megatron_training(monkeypatch):
    """Stand-ins for megatron.training.arguments / .training, as in Megatron-LM core_v0.16.1 at the patched points."""
    import dataclasses

    from megatron.core.optimizer import OptimizerConfig, optimizer_config

    # the subclasses Megatron-LM core_v0.16 builds (megatron-core 0.16.0 on); OptimizerConfig itself before
    AdamOptimizerConfig = getattr(optimizer_config, "AdamOptimizerConfig", OptimizerConfig)
    SGDOptimizerConfig = getattr(optimizer_config, "SGDOptimizerConfig", OptimizerConfig)

    fake_arguments = types.ModuleType("megatron.training.arguments")

    def _add_training_args(parser):
        group = parser.add_argument_group(title="training")
        group.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd", "muon", "dist_muon"])
        group.add_argument("--lr", type=float, default=None)
        return parser

    def parse_args(extra_args_provider=None, ignore_unknown_args=False, argv=None):
        parser = argparse.ArgumentParser(allow_abbrev=False)
        parser = fake_arguments._add_training_args(parser)  # looked up at call time, as in Megatron-LM
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        if ignore_unknown_args:
            return parser.parse_known_args(argv)[0]
        return parser.parse_args(argv)

    fake_arguments._add_training_args = _add_training_args
    fake_arguments.parse_args = parse_args

    fake_training = types.ModuleType("megatron.training.training")

    def get_megatron_optimizer_config(args):
        if args.optimizer == "adam" or "muon" in args.optimizer:
            fields = dataclasses.fields(AdamOptimizerConfig)
            return AdamOptimizerConfig(**{f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)}), None
        if args.optimizer == "sgd":
            return SGDOptimizerConfig(lr=args.lr), None
        raise ValueError("Invalid optimizer type!")

    fake_training.get_megatron_optimizer_config = get_megatron_optimizer_config
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_patches.optimizer import muon_module

    fake_training.get_megatron_optimizer = get_megatron_optimizer  # imported by Megatron-LM on every version
    muon = muon_module()
    if muon is not None and muon.__name__.endswith(".muon"):  # 0.16, 0.17: Megatron-LM imports its Muon builder
        fake_training.get_megatron_muon_optimizer = muon.get_megatron_muon_optimizer
    package = types.ModuleType("megatron.training")
    package.__path__ = []
    package.arguments, package.training = fake_arguments, fake_training
    monkeypatch.setitem(sys.modules, "megatron.training", package)
    monkeypatch.setitem(sys.modules, "megatron.training.arguments", fake_arguments)
    monkeypatch.setitem(sys.modules, "megatron.training.training", fake_training)
    return fake_arguments, fake_training


@pytest.fixture
def fake_megatron_lm(monkeypatch):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    import megatron_patches

    assert not megatron_patches.is_applied()
    yield _fake_megatron_training(monkeypatch)
    megatron_patches.remove()


def test_apply_patches_megatron_lm_optimizer_choices_and_remove_restores(fake_megatron_lm):
    import megatron_patches

    fake_arguments, fake_training = fake_megatron_lm
    original_add, original_config = fake_arguments._add_training_args, fake_training.get_megatron_optimizer_config
    with pytest.raises(SystemExit):  # unpatched, Megatron-LM refuses the name
        fake_arguments.parse_args(argv=["--optimizer", "adampower"])
    megatron_patches.apply()
    assert fake_arguments._add_training_args is not original_add
    # the second parse: a fresh parser built by the patched _add_training_args alone, no extra provider
    parser = fake_arguments._add_training_args(argparse.ArgumentParser())
    assert parser.parse_args(["--optimizer", "adampower"]).optimizer == "adampower"
    assert fake_arguments.parse_args(ignore_unknown_args=True,
                                     argv=["--optimizer", "adampower", "--gradpower-p", "1.3"]).optimizer == "adampower"
    # first parse with our provider, then the optimizer config Megatron-LM builds from the args
    args = fake_arguments.parse_args(add_arguments, argv=["--optimizer", "adampower", "--gradpower-p", "1.3",
                                                          "--gradpower-p-expert", "0.8", "--lr", "1e-3"])
    config, _ = fake_training.get_megatron_optimizer_config(args)
    assert (config.optimizer, config.gradpower_p, config.gradpower_p_expert, config.lr) == ("adampower", 1.3, 0.8, 1e-3)
    assert args.optimizer == "adampower"
    assert fake_training.get_megatron_optimizer_config(fake_arguments.parse_args(argv=[]))[0].optimizer == "adam"
    megatron_patches.remove()
    assert fake_arguments._add_training_args is original_add
    assert fake_training.get_megatron_optimizer_config is original_config
    with pytest.raises(SystemExit):
        fake_arguments._add_training_args(argparse.ArgumentParser()).parse_args(["--optimizer", "adampower"])


def test_megatron_lm_muonpower_config_and_builder(fake_megatron_lm, monkeypatch):
    """--optimizer muonpower in Megatron-LM: its Muon config plus our fields, and its own imported name of
    get_megatron_muon_optimizer wrapped (once), restored by remove()."""
    import megatron_patches

    fake_arguments, fake_training = fake_megatron_lm
    from megatron_patches.optimizer import muon_module

    muon = muon_module()  # megatron.core.optimizer.muon (0.16, 0.17), .emerging_optimizers (0.18 on)
    if muon is None:
        pytest.skip("this megatron-core has no Muon (0.16 on)")
    monkeypatch.setattr(muon, "HAVE_EMERGING_OPTIMIZERS", True)  # importable or not here: only the config is built
    builder = "get_megatron_muon_optimizer" if hasattr(fake_training, "get_megatron_muon_optimizer") else \
        "get_megatron_optimizer"  # what builds Muon there: 0.16 and 0.17, 0.18 on
    original = getattr(fake_training, builder)
    megatron_patches.apply()
    flag = "_gradpower_muon" if builder == "get_megatron_muon_optimizer" else "_gradpower_build"
    assert getattr(getattr(fake_training, builder), flag, False)
    args = fake_arguments.parse_args(add_arguments, argv=["--optimizer", "muonpower", "--gradpower-p", "0.9",
                                                          "--gradpower-p-adam", "1.1", "--lr", "1e-3"])
    config, _ = fake_training.get_megatron_optimizer_config(args)
    assert (config.optimizer, config.gradpower_p, config.gradpower_p_expert, config.gradpower_p_adam, config.lr) == \
        ("muonpower", 0.9, None, 1.1, 1e-3)
    assert args.optimizer == "muonpower"
    megatron_patches.remove()
    assert getattr(fake_training, builder) is original


def test_megatron_lm_before_core_v0_16_is_refused_not_ignored(fake_megatron_lm, monkeypatch):
    """Megatron-LM before core_v0.16.0 has no get_megatron_optimizer_config: --gradpower-p could not reach the
    optimizer config, so apply() refuses it (naming the version) and patches nothing."""
    import megatron_patches

    fake_arguments, fake_training = fake_megatron_lm
    original_add = fake_arguments._add_training_args
    monkeypatch.delattr(fake_training, "get_megatron_optimizer_config")
    with pytest.raises(megatron_patches.UnsupportedMegatronError,
                       match=r"megatron\.training\.training has no get_megatron_optimizer_config \(Megatron-LM "
                             r"core_v0\.16\.0 on\).*would be ignored\. Use Megatron-LM core_v0\.16\.0 or newer"):
        megatron_patches.apply()
    assert not megatron_patches.is_applied() and fake_arguments._add_training_args is original_add


def test_megatron_lm_blockwise_lr_config(fake_megatron_lm):
    """Megatron-LM's get_megatron_optimizer_config (played by a stand-in) gets gradpower_blockwise_lr from
    --blockwise-lr for plain 'adam' too, and refuses an unknown block when it builds the config."""
    import megatron_patches
    from megatron.core.optimizer import optimizer_config

    if not hasattr(optimizer_config, "ParamKey"):
        pytest.skip("blockwise lr needs megatron-core 0.16 or newer")
    fake_arguments, fake_training = fake_megatron_lm
    megatron_patches.apply()
    args = fake_arguments.parse_args(add_arguments, argv=["--blockwise-lr", "--lr", "1e-3"])
    config, _ = fake_training.get_megatron_optimizer_config(args)
    assert (config.optimizer, config.gradpower_blockwise_lr, config.lr) == ("adam", True, 1e-3)
    args.blockwise_lr = {"attn": 2.0}
    with pytest.raises(ValueError, match="unknown block 'attn'"):
        fake_training.get_megatron_optimizer_config(args)


def test_with_extra_args_chains_the_scripts_provider():
    seen = {}

    def pretrain(dataset_provider, model_provider, model_type, forward_step, process_non_loss_data_func=None,
                 extra_args_provider=None, args_defaults={}):
        parser = argparse.ArgumentParser()
        parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
        seen["args"] = extra_args_provider(parser).parse_args(["--own", "x", "--optimizer", "adampower"])

    def own(parser):
        parser.add_argument("--own")
        return parser

    arguments.with_extra_args(pretrain)(1, 2, 3, 4, extra_args_provider=own)
    assert (seen["args"].own, seen["args"].optimizer, seen["args"].gradpower_p) == ("x", "adampower", 1.2)
    arguments.with_extra_args(pretrain)(1, 2, 3, 4, None, own)  # positionally
    assert seen["args"].own == "x"
    with pytest.raises(SystemExit):  # no provider of its own: only ours is added
        arguments.with_extra_args(pretrain)(1, 2, 3, 4)
    refused = []
    arguments.with_extra_args(pretrain, lambda args, parser: refused.append(args.own))(1, 2, 3, 4, None, own)
    assert refused == ["x"]  # after_parse sees the resolved args
    with pytest.raises(RuntimeError, match="takes no extra_args_provider"):
        arguments.with_extra_args(lambda a: a)


# --- the entry point -------------------------------------------------------------------------------------------

def run_entry(argv, env=None, cwd=None):
    environ = {k: v for k, v in os.environ.items() if k != "MEGATRON_LM_PATH"}
    environ.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "megatron_patches.pretrain_gpt", *argv], env=environ,
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=300)


def test_entry_without_megatron_lm_says_how_to_point_at_it(tmp_path):
    result = run_entry(["--num-layers", "2"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert ("Megatron-LM not found (no importable module pretrain_gpt, and $MEGATRON_LM_PATH is not set)"
            in result.stderr)
    assert "MEGATRON_LM_PATH=/path/to/Megatron-LM" in result.stderr and "pip install" in result.stderr
    result = run_entry([], env={"MEGATRON_LM_PATH": str(tmp_path)})
    assert result.returncode == 2 and f"$MEGATRON_LM_PATH={tmp_path}: no pretrain_gpt.py" in result.stderr
    result = run_entry(["--megatron-lm-path", str(tmp_path / "nope")])
    assert result.returncode == 2 and "--megatron-lm-path" in result.stderr and "no pretrain_gpt.py" in result.stderr
    (tmp_path / "pretrain_gpt.py").write_text("raise SystemExit('ran the script')\n")
    result = run_entry([f"--megatron-lm-path={tmp_path}"])
    if importlib.util.find_spec("megatron.training") is None:
        # a pretrain_gpt.py, but no megatron.training next to it (megatron-core before 0.17 ships none)
        assert result.returncode == 2 and "megatron.training cannot be imported" in result.stderr
    else:  # megatron-core 0.17 on ships megatron.training: the script found is run
        assert result.returncode == 1 and "ran the script" in result.stderr


def test_split_path():
    from megatron_patches.pretrain_gpt import split_path

    assert split_path(["--a", "--megatron-lm-path", "/m", "--b"]) == ("/m", ["--a", "--b"])
    assert split_path(["--megatron-lm-path=/m", "--b"]) == ("/m", ["--b"])
    assert split_path(["--b"]) == (None, ["--b"])


FAKE_TRAINING = '''
"""Stand-in for megatron/training/training.py: pretrain parses twice, builds the model and the optimizer config."""
import dataclasses, json
from megatron.core.optimizer import OptimizerConfig, optimizer_config
from megatron.training import arguments

AdamOptimizerConfig = getattr(optimizer_config, "AdamOptimizerConfig", OptimizerConfig)

_ARGS = None


def get_args():
    return _ARGS


def get_megatron_optimizer_config(args):
    if args.optimizer != "adam":
        raise ValueError("Invalid optimizer type!")
    fields = dataclasses.fields(AdamOptimizerConfig)
    return AdamOptimizerConfig(**{f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)}), None


def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
             process_non_loss_data_func=None, extra_args_provider=None, args_defaults={}, store=None):
    global _ARGS
    _ARGS = args = arguments.parse_args(extra_args_provider)
    again = arguments.parse_args(None, ignore_unknown_args=True)  # as ft_integration.setup() does
    config, _ = get_megatron_optimizer_config(args)
    gates = None
    if args.build_model:  # get_model: the provider's model before DDP
        model = model_provider(pre_process=True, post_process=True)
        gates = [layer.gpas_gate.act if hasattr(layer, "gpas_gate") else None
                 for layer in model.decoder.layers]
    print("RESULT " + json.dumps({"own": args.own_flag, "optimizer": config.optimizer, "p": config.gradpower_p,
                                  "p_expert": config.gradpower_p_expert, "gpas": args.gpas,
                                  "gpas_act": args.gpas_act, "again": again.optimizer, "lr": config.lr,
                                  "gates": gates}))
'''

FAKE_ARGUMENTS = '''
"""Stand-in for megatron/training/arguments.py at the points megatron_patches touches."""
import argparse


def _add_training_args(parser):
    group = parser.add_argument_group(title="training")
    group.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd"])
    group.add_argument("--lr", type=float, default=None)
    group.add_argument("--overlap-moe-expert-parallel-comm", action="store_true")
    group.add_argument("--cuda-graph-impl", default="none", choices=["none", "local", "transformer_engine"])
    group.add_argument("--build-model", action="store_true")  # stand-in only: call the model provider
    return parser


def parse_args(extra_args_provider=None, ignore_unknown_args=False):
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    parser = _add_training_args(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    if ignore_unknown_args:
        args, _ = parser.parse_known_args()
    else:
        args = parser.parse_args()
    return args
'''

FAKE_PRETRAIN_GPT = '''
"""Stand-in for Megatron-LM's pretrain_gpt.py: its own extra_args_provider and a model provider building a
tiny real megatron-core GPTModel (one CPU process, through the tests' CPU shim); pretrain() imported at run time."""
import os
import sys
from functools import partial

from megatron.training import pretrain


def add_own_args(parser):
    parser.add_argument("--own-flag", default="none")
    return parser


def model_provider(builder, pre_process=True, post_process=True, vp_stage=None):
    import torch.distributed as dist
    sys.path.insert(0, os.environ["GRADPOWER_TESTS_DIR"])
    import megatron_cpu_shim
    megatron_cpu_shim.install()
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["GRADPOWER_TEST_PORT"],
                            rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True)
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=32, max_sequence_length=8)


if __name__ == "__main__":
    pretrain(None, partial(model_provider, "gpt_builder"), None, None, extra_args_provider=add_own_args,
             args_defaults={"tokenizer_type": "x"})
'''


@pytest.fixture
def fake_checkout(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    training = tmp_path / "Megatron-LM" / "megatron" / "training"  # megatron/ stays a namespace package
    training.mkdir(parents=True)
    (training / "__init__.py").write_text("from .training import get_args, pretrain\n")
    (training / "training.py").write_text(textwrap.dedent(FAKE_TRAINING))
    (training / "arguments.py").write_text(textwrap.dedent(FAKE_ARGUMENTS))
    (tmp_path / "Megatron-LM" / "pretrain_gpt.py").write_text(textwrap.dedent(FAKE_PRETRAIN_GPT))
    return tmp_path / "Megatron-LM"


def _result(completed):
    assert completed.returncode == 0, completed.stderr
    line = [x for x in completed.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, completed.stdout + completed.stderr
    return json.loads(line[0][len("RESULT "):])


def test_entry_runs_the_unchanged_script_with_chained_providers(fake_checkout, tmp_path):
    config = write_config(tmp_path, {"gradpower_p_expert": 0.9})
    env = {"MEGATRON_LM_PATH": str(fake_checkout)}
    result = _result(run_entry(["--own-flag", "mine", "--optimizer", "adampower", "--gradpower-config", config,
                                "--gradpower-p", "1.3", "--lr", "0.001"], env=env))
    assert result == {"own": "mine", "optimizer": "adampower", "p": 1.3, "p_expert": 0.9, "gpas": False,
                      "gpas_act": "silu", "again": "adampower", "lr": 0.001, "gates": None}
    # optimizer from the file: the first parse (with our provider) reads it; a second parse without our provider
    # does not know the file, and sees Megatron-LM's default
    config = write_config(tmp_path, {"optimizer": "adampower"}, "opt.json")
    result = _result(run_entry(["--gradpower-config", config], env=env))
    assert (result["optimizer"], result["p"], result["again"]) == ("adampower", 1.2, "adam")
    # found as an importable module instead, and plain adam untouched
    result = _result(run_entry(["--lr", "0.01"], env={"PYTHONPATH": f"{ROOT}{os.pathsep}{fake_checkout}"},
                               cwd=tmp_path))
    assert (result["optimizer"], result["again"], result["own"], result["lr"]) == ("adam", "adam", "none", 0.01)


def test_entry_puts_gpas_into_the_model_its_provider_builds(fake_checkout, tmp_path):
    env = {"MEGATRON_LM_PATH": str(fake_checkout), "GRADPOWER_TESTS_DIR": str(ROOT / "tests"),
           "GRADPOWER_TEST_PORT": str(free_port())}
    result = _result(run_entry(["--build-model", "--gpas", "--gpas-act", "tanh"], env=env))
    assert (result["gpas"], result["gates"]) == (True, ["tanh", "tanh"])
    env["GRADPOWER_TEST_PORT"] = str(free_port())
    config = write_config(tmp_path, {"gpas": True})
    assert _result(run_entry(["--build-model", "--gradpower-config", config], env=env))["gates"] == ["silu", "silu"]
    env["GRADPOWER_TEST_PORT"] = str(free_port())
    assert _result(run_entry(["--build-model"], env=env))["gates"] == [None, None]


@pytest.mark.parametrize("argv, named", [
    (["--gpas", "--overlap-moe-expert-parallel-comm"], "--gpas cannot be combined with "
                                                       "--overlap-moe-expert-parallel-comm=True"),
    (["--gpas", "--cuda-graph-impl", "local"], "--gpas cannot be combined with --cuda-graph-impl='local'")])
def test_entry_refuses_gpas_with_a_layer_path_it_cannot_cover(fake_checkout, argv, named):
    completed = run_entry(argv, env={"MEGATRON_LM_PATH": str(fake_checkout)})
    assert completed.returncode == 2, completed.stderr
    assert named in completed.stderr, completed.stderr
    assert run_entry(argv[1:], env={"MEGATRON_LM_PATH": str(fake_checkout)}).returncode == 0  # fine without GPAS


def test_entry_reports_bad_flags_as_argparse_does(fake_checkout):
    completed = run_entry(["--optimizer", "adampower", "--gradpower-p", "0"],
                          env={"MEGATRON_LM_PATH": str(fake_checkout)})
    assert completed.returncode == 2
    assert "error: invalid --gradpower-p=0: must be a finite number > 0" in completed.stderr
