"""The compare tool (issue 20): finished runs reused only with the same settings; every run's settings checked,
with one-line errors naming the entry, before anything is launched. In-process: launches are faked."""

import json
import subprocess
from pathlib import Path

import pytest

from gradpower_ds.jobs import compare
from gradpower_ds.jobs.metrics import MetricsLog
from gradpower_ds.jobs.train_config import load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.json"
TRAIN = ["--config", str(QUICKSTART), "--steps", "8", "--warmup_steps", "2"]


@pytest.fixture
def launches(monkeypatch):
    """Fakes the deepspeed launches: each 'run' writes what a completed gradpower_ds.jobs.train run leaves."""
    calls = []
    real_run = subprocess.run  # compare.subprocess is the subprocess module: its run is patched for everyone

    def fake_run(cmd, *args, **kwargs):
        if "gradpower_ds.jobs.train" not in cmd:  # e.g. matplotlib's fc-list when its font cache is first built
            return real_run(cmd, *args, **kwargs)
        train_args = cmd[cmd.index("gradpower_ds.jobs.train") + 1:]
        calls.append(train_args)
        fake_completed_run(train_args, world_size=int(cmd[cmd.index("--num_gpus") + 1]))

        class Done:
            returncode = 0
        return Done()

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    return calls


def fake_completed_run(train_args, world_size=1, val_loss=3.0):
    cfg = load_config(train_args, world_size=world_size)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    log = MetricsLog(run_dir, tensorboard=False)
    log.log(step=cfg.steps, tokens=100, train_loss=val_loss, val_loss=val_loss)
    log.close()
    (run_dir / "summary.json").write_text(json.dumps({"val_loss": val_loss, "tokens_per_s": 10.0, "tokens": 100,
                                                      "world_size": world_size}))


def compare_args(out, *train, optimizers=("adamw", "adampower:1.2")):
    return ["--optimizers", *optimizers, "--seeds", "0", "--nproc", "1", "--out", str(out), "--", *TRAIN, *train]


def one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


# ---- reuse only with the same settings ---------------------------------------------------------------------------------

def test_reuses_runs_only_with_the_same_settings(tmp_path, launches, capsys):
    out = tmp_path / "cmp"
    compare.main(compare_args(out))
    assert len(launches) == 2 and all("--resume" in a for a in launches)
    capsys.readouterr()
    compare.main(compare_args(out))  # the same command: both reused, nothing launched
    assert len(launches) == 2 and capsys.readouterr().out.count("already complete, reused") == 2
    err = one_line_exit_2(compare_args(out, "--lr", "0.0001", "--dim", "64"), capsys)
    run_dir = out / "adamw" / "seed0"
    assert f"{run_dir} holds a run with other settings (" in err
    assert "dim: 128 there, 64 now" in err and "lr: 0.003 there, 0.0001 now" in err
    assert "use another --out, or delete" in err and len(launches) == 2
    # settings that do not change what is trained or measured do not matter
    compare.main(compare_args(out, "--log_every", "1", "--save_every", "2", "--tensorboard", "false"))
    assert len(launches) == 2


def test_other_rank_count_is_not_reused(tmp_path, launches, capsys):
    out = tmp_path / "cmp"
    compare.main(compare_args(out, optimizers=["adamw"]))
    args = compare_args(out, optimizers=["adamw"])
    args[args.index("--nproc") + 1] = "2"
    err = one_line_exit_2(args, capsys)
    assert "ranks (--nproc): 1 there, 2 now" in err and len(launches) == 1


def test_unfinished_run_with_other_settings_is_refused_same_settings_resumed(tmp_path, launches, capsys):
    out = tmp_path / "cmp"
    run_dir = out / "adamw" / "seed0"
    run_dir.mkdir(parents=True)
    recorded = load_config([*TRAIN, "--run_dir", str(run_dir), "--optimizer", "adamw"]).to_dict()
    (run_dir / "config.json").write_text(json.dumps({**recorded, "seq_len": 64}))
    err = one_line_exit_2(compare_args(out, optimizers=["adamw"]), capsys)
    assert "seq_len: 64 there, 128 now" in err and not launches
    (run_dir / "config.json").write_text(json.dumps({**recorded, "progress": False, "resume": True}))
    compare.main(compare_args(out, optimizers=["adamw"]))  # same settings: continued (with --resume true)
    assert len(launches) == 1


def test_completed_run_without_recorded_settings_is_not_reused(tmp_path, launches, capsys):
    run_dir = tmp_path / "cmp" / "adamw" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"val_loss": 1.0, "tokens_per_s": 1.0, "tokens": 1}))
    err = one_line_exit_2(compare_args(tmp_path / "cmp", optimizers=["adamw"]), capsys)
    assert "no config.json to check its settings against" in err and not launches


# ---- settings checked before any launch ---------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ("adampower:abc", r"--optimizers entry 'adampower:abc': the power 'abc' is not a number"),
    ("adampower:0", r"--optimizers entry 'adampower:0': invalid power=0: must be a finite number > 0"),
    ("adampower:-1", r"--optimizers entry 'adampower:-1': invalid power=-1:"),
    ("adampower:nan", r"--optimizers entry 'adampower:nan': power=nan must be a finite number or null"),
    ("muonpower", r"--optimizers entry 'muonpower': muonpower needs power, MuonPower's p"),
    ("muonpower:0", r"--optimizers entry 'muonpower:0': invalid power=0: must be a finite number > 0 \(1.0 is plain "
                    r"Muon\)"),
    ("sgd", r"--optimizers entry 'sgd': unknown optimizer 'sgd'"),
])
def test_bad_entries_are_named(entry, message):
    with pytest.raises(ValueError, match=message):
        compare.parse_variant(entry)


def test_bad_settings_fail_before_the_first_launch(tmp_path, launches, capsys):
    err = one_line_exit_2(compare_args(tmp_path, optimizers=["adamw", "adampower:0"]), capsys)
    assert err.startswith("python -m gradpower_ds compare: error: --optimizers entry 'adampower:0'")
    err = one_line_exit_2(compare_args(tmp_path, optimizers=["adamw", "adampower:abc"]), capsys)
    assert "'adampower:abc': the power 'abc' is not a number" in err
    err = one_line_exit_2(compare_args(tmp_path, "--betas", "1.0", "0.95"), capsys)
    assert "adamw seed 0: --betas: invalid betas[0]=1: must be a finite number in [0, 1)" in err
    err = one_line_exit_2(compare_args(tmp_path, "--data", str(tmp_path / "missing.txt")), capsys)
    assert "adamw seed 0: --data: data path not found" in err
    err = one_line_exit_2(compare_args(tmp_path, "--power", "1.5"), capsys)
    assert "--power after -- is set by compare for each run" in err
    err = one_line_exit_2(compare_args(tmp_path, "--ep_size", "2") + ["--num_experts", "2"], capsys)
    assert "ep_size=2 cannot be placed" in err and "(1 ranks)" in err
    assert not launches and not list(tmp_path.iterdir())


def test_muon_variants_pass_their_power_and_compare_against_muon(tmp_path, launches, capsys):
    table = compare.main(compare_args(tmp_path / "cmp", "--grad_clip", "0", optimizers=("muon", "muonpower:0.9")))
    assert launches[0][launches[0].index("--optimizer") + 1] == "muon" and "--power" not in launches[0]
    assert launches[1][launches[1].index("--power") + 1] == "0.9"  # muonpower:P is the run's power, P
    assert load_config(launches[1]).optimizer_label() == "muonpower p=0.9 adam p=1.2"
    assert set(table) == {"muon", "muonpower-p0.9"}
    assert "Δ vs muon" in capsys.readouterr().out
    err = one_line_exit_2(compare_args(tmp_path, "--power", "0.8", "--grad_clip", "0"), capsys)
    assert "--power after -- is set by compare for each run" in err


def test_blockwise_variants_are_labelled_and_passed(tmp_path, launches, capsys):
    table = compare.main(["--blockwise_lr", "off", "on", *compare_args(tmp_path / "cmp")])
    assert set(table) == {"adamw", "adampower-p1.2", "adamw-bw", "adampower-p1.2-bw"}
    flags = [args[args.index("--blockwise_lr") + 1] for args in launches]
    assert flags == ["false", "false", "true", "true"]
    assert load_config(launches[3]).optimizer_label() == "adampower p=1.2 + blockwise lr"
    assert "Δ vs adamw" in capsys.readouterr().out
    err = one_line_exit_2(compare_args(tmp_path, "--blockwise_lr", "true"), capsys)
    assert "--blockwise_lr after -- is set by compare for each run" in err
    err = one_line_exit_2(["--blockwise_lr", "on", *compare_args(tmp_path / "m", "--grad_clip", "0",
                                                                  optimizers=("muon",))], capsys)
    assert "blockwise_lr with optimizer muon" in err
