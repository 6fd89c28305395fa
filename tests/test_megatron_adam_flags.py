"""megatron_patches.arguments.check_adam_flags: Megatron's --lr, --weight-decay, --adam-eps, --adam-beta1 and
--adam-beta2 are checked (hyperparams.check_settings) when the parse ends, for every --optimizer, so a bad value
exits 2 with a one-line message naming the flag instead of failing later on every rank."""

import argparse

import pytest

from megatron_patches.arguments import add_arguments


def megatron_like_parser(adam_flags=True):
    """A parser with Megatron-LM core_v0.16.1's optimizer flags and defaults (its --lr defaults to None)."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd", "muon"])
    parser.add_argument("--lr", type=float, default=None)
    if adam_flags:
        parser.add_argument("--weight-decay", type=float, default=0.01)
        parser.add_argument("--adam-beta1", type=float, default=0.9)
        parser.add_argument("--adam-beta2", type=float, default=0.999)
        parser.add_argument("--adam-eps", type=float, default=1e-08)
    return add_arguments(parser)


BAD = [("--adam-eps", "-1", "must be a finite number >= 0"),
       ("--adam-beta1", "1.5", "must be a finite number in [0, 1)"),
       ("--adam-beta2", "1.0", "must be a finite number in [0, 1)"),
       ("--adam-beta1", "nan", "must be a finite number in [0, 1)"),
       ("--adam-beta2", "-0.1", "must be a finite number in [0, 1)"),
       ("--lr", "-0.1", "must be a finite number >= 0"),
       ("--lr", "inf", "must be a finite number >= 0"),
       ("--weight-decay", "-1", "must be a finite number >= 0")]


@pytest.mark.parametrize("optimizer", ["adam", "adampower", "muonpower"])
@pytest.mark.parametrize("flag, value, rule", BAD)
def test_bad_adam_flag_exits_2_naming_flag_value_and_rule(flag, value, rule, optimizer, capsys):
    argv = ["--optimizer", optimizer, flag, value] + (["--gradpower-p", "0.9"] if optimizer == "muonpower" else [])
    with pytest.raises(SystemExit) as exit_info:
        megatron_like_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith(f": error: invalid {flag}={float(value):g}: {rule}")  # one line


def test_good_values_and_defaults_parse():
    args = megatron_like_parser().parse_args([])
    assert (args.lr, args.weight_decay, args.adam_beta1, args.adam_beta2, args.adam_eps) == \
        (None, 0.01, 0.9, 0.999, 1e-08)
    args = megatron_like_parser().parse_args(["--optimizer", "adampower", "--lr", "0", "--weight-decay", "0",
                                              "--adam-beta1", "0", "--adam-beta2", "0.95", "--adam-eps", "0"])
    assert (args.lr, args.weight_decay, args.adam_beta1, args.adam_beta2, args.adam_eps, args.gradpower_p) == \
        (0.0, 0.0, 0.0, 0.95, 0.0, 1.2)


def test_parser_without_adam_flags_is_left_alone(capsys):
    args = megatron_like_parser(adam_flags=False).parse_args(["--lr", "1e-3"])
    assert args.lr == 1e-3 and not hasattr(args, "adam_eps")
    with pytest.raises(SystemExit):
        megatron_like_parser(adam_flags=False).parse_args(["--lr", "-1"])
    assert "invalid --lr=-1: must be a finite number >= 0" in capsys.readouterr().err
