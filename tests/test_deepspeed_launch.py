"""The ready configs, the zero-code-change runner and the multi-node launch script, on 2 CPU ranks (gloo).

An unchanged user script (jobs/ds_train_script.py, which never imports gradpower_ds)
is started three ways, each through ``gradpower_ds.jobs.run``:

- torchrun: every dense config in configs/ (ZeRO-1/2/3, ZeRO-3 + offload) on the toy LLaMA;
- the ``deepspeed`` launcher on one node: configs/moe.json on the MoE toy with experts
  sharded over both ranks (ep_size=2), plus its fp32 variants with power=1 and with
  DeepSpeed's own "AdamW";
- launch/multinode.sh as two "nodes" on loopback (NODE_RANK 0 and 1, no ssh): the same
  MoE configs with every expert on every rank (ep_size=1).

Those are ``slow``. Cheap ones check the runner's argument handling, ``__main__`` semantics and usage errors,
and the command multinode.sh builds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, launch_env, torchrun
from gradpower_ds.jobs.run import split_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
JOB = ROOT / "tests" / "jobs" / "ds_train_script.py"
DENSE = ("zero1", "zero2", "zero3", "zero3_offload")
MOE_RUNS = ("moe", "moe_fp32_power1", "moe_fp32_adamw")
FP32_TOL = 1e-5
TIMEOUT = 900


def check(proc: subprocess.CompletedProcess, what: str) -> None:
    """Fails with the tail of the output when a launch exited non-zero."""
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-8000:]}"


def load(out: Path) -> list[dict]:
    """Both ranks' records (rank0.pt, rank1.pt) written by the training script."""
    return [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


def moe_configs(folder: Path) -> list[Path]:
    """configs/moe.json and two fp32 variants of it: AdamPower power=1 (no expert_power) and DeepSpeed's AdamW."""
    config = json.loads((CONFIGS / "moe.json").read_text())
    config["bf16"] = {"enabled": False}
    params = {k: v for k, v in config["optimizer"]["params"].items() if k != "expert_power"}
    power1 = dict(config, optimizer={"type": "AdamPower", "params": dict(params, power=1.0)})
    params.pop("power")
    adamw = dict(config, optimizer={"type": "AdamW", "params": params})
    paths = [CONFIGS / "moe.json", folder / "moe_fp32_power1.json", folder / "moe_fp32_adamw.json"]
    for path, cfg in zip(paths[1:], (power1, adamw)):
        path.write_text(json.dumps(cfg))
    return paths


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """torchrun -m gradpower_ds.jobs.run over every dense config."""
    out = tmp_path_factory.mktemp("dense")
    torchrun("-m", "gradpower_ds.jobs.run", JOB, "--deepspeed_config", *(CONFIGS / f"{c}.json" for c in DENSE),
             "--out", out, timeout=TIMEOUT)
    return load(out)


@pytest.fixture(scope="module")
def moe_ep2(tmp_path_factory):
    """deepspeed --num_gpus 2 --module gradpower_ds.jobs.run: the MoE configs, experts sharded (ep_size=2)."""
    out = tmp_path_factory.mktemp("moe_ep2")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "gradpower_ds.jobs.run", str(JOB), "--deepspeed_config", *map(str, moe_configs(out)),
           "--moe_ep_size", "2", "--out", str(out)]
    check(subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=TIMEOUT), "deepspeed")
    return load(out)


@pytest.fixture(scope="module")
def moe_ep1_multinode(tmp_path_factory):
    """launch/multinode.sh started twice (NODE_RANK 0 and 1) on a 2-entry loopback hostfile: MoE, ep_size=1."""
    out = tmp_path_factory.mktemp("multinode")
    hostfile = out / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names: the launcher refuses duplicates
    env = dict(launch_env(), HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               NUM_GPUS="1")
    cmd = ["bash", str(ROOT / "launch" / "multinode.sh"), str(JOB), "--deepspeed_config",
           *map(str, moe_configs(out)), "--moe_ep_size", "1", "--out", str(out)]
    nodes = [subprocess.Popen(cmd, env=dict(env, NODE_RANK=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        for rank, node in enumerate(nodes):
            stdout, _ = node.communicate(timeout=TIMEOUT)
            check(subprocess.CompletedProcess(cmd, node.returncode, stdout, ""), f"multinode.sh NODE_RANK={rank}")
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    return load(out)


def update_norm(record: dict) -> float:
    """Norm of (trained - initial) fp32 params over the whole model."""
    return torch.stack([(record["params"][k] - record["start"][k]).norm() for k in record["params"]]).norm().item()


def rel_error(got: dict, want: dict) -> float:
    """Largest per-tensor ||got - want|| / ||want||."""
    return max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)


def assert_trained(record: dict, config: dict) -> None:
    """Our native optimizer with the config's hyperparameters ran, losses finite, parameters moved."""
    params = config["optimizer"]["params"]
    assert record["optimizer"] == "CPUAdamPower"
    for group in record["groups"]:
        assert group["lr"] == params["lr"] and list(group["betas"]) == params["betas"]
        assert group["weight_decay"] == params["weight_decay"]
    losses = torch.tensor(record["losses"])
    assert losses.numel() > 0 and torch.isfinite(losses).all()
    assert update_norm(record) > 1e-3
    assert all(torch.isfinite(p).all() for p in record["params"].values())


@pytest.mark.slow
@pytest.mark.parametrize("name", DENSE)
def test_dense_config_trains_on_two_ranks(dense, name):
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    assert config["optimizer"]["type"] == "AdamPower" and config["bf16"]["enabled"]
    ranks = [r[name] for r in dense]
    for record in ranks:
        assert_trained(record, config)
        assert [g["power"] for g in record["groups"]] == [config["optimizer"]["params"]["power"]]
    assert all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]) for k in ranks[0]["params"])
    # Sharding does not change the math: each stage's update matches ZeRO-1's up to bf16 rounding
    # (measured: ZeRO-2 1.8 %, ZeRO-3 3.3 % of the update's norm; cf. LOW_PRECISION_TOL in test_deepspeed_matrix).
    base = dense[0]["zero1"]
    diff = torch.stack([(ranks[0]["params"][k] - base["params"][k]).norm() for k in base["params"]]).norm()
    assert diff.item() <= 0.1 * update_norm(base)


@pytest.mark.slow
def test_torchrun_runner_launch(dense):
    assert all(r[name]["optimizer"] == "CPUAdamPower" for r in dense for name in DENSE)
    assert [r["launch"] for r in dense] == [dict(world_size=2, local_rank_arg=-1, local_rank_env=rank)
                                           for rank in (0, 1)]


@pytest.mark.slow
def test_deepspeed_launcher_runner_passes_local_rank(moe_ep2):
    assert all(r[name]["optimizer"] == "CPUAdamPower" for r in moe_ep2 for name in MOE_RUNS[:2])
    # The launcher puts --local_rank=N before the script; the runner hands it on to the script.
    assert [r["launch"] for r in moe_ep2] == [dict(world_size=2, local_rank_arg=rank, local_rank_env=rank)
                                             for rank in (0, 1)]


@pytest.mark.slow
def test_multinode_both_nodes_trained(moe_ep1_multinode):
    assert [r["launch"] for r in moe_ep1_multinode] == [dict(world_size=2, local_rank_arg=0, local_rank_env=0)] * 2
    assert all(r[name]["optimizer"] == "CPUAdamPower" for r in moe_ep1_multinode for name in MOE_RUNS[:2])
    for name in MOE_RUNS:
        a, b = (r[name]["params"] for r in moe_ep1_multinode)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # ep_size=1: full replicas


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2])
def test_moe_expert_power_on_expert_groups(moe_ep2, moe_ep1_multinode, ep):
    config = json.loads((CONFIGS / "moe.json").read_text())
    params = config["optimizer"]["params"]
    assert params["expert_power"] != params["power"]
    for record in (r["moe"] for r in (moe_ep1_multinode if ep == 1 else moe_ep2)):
        assert_trained(record, config)
        powers = {bool(g.get("moe")): g["power"] for g in record["groups"]}
        assert powers == {True: params["expert_power"], False: params["power"]}
        assert all(g["name"] == f"ep_size_{ep}" for g in record["groups"] if g.get("moe"))


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2])
def test_moe_power1_matches_deepspeed_adamw(moe_ep2, moe_ep1_multinode, ep):
    for rank in (moe_ep1_multinode if ep == 1 else moe_ep2):
        ours, adamw = rank["moe_fp32_power1"], rank["moe_fp32_adamw"]
        assert ours["optimizer"] == "CPUAdamPower" and adamw["optimizer"] != "CPUAdamPower"
        assert {g["power"] for g in ours["groups"]} == {1.0}
        assert update_norm(adamw) > 1e-3
        assert rel_error(ours["params"], adamw["params"]) < FP32_TOL


@pytest.mark.slow
def test_moe_expert_parallel_matches_replicated_experts(moe_ep2, moe_ep1_multinode):
    # Experts sharded over 2 ranks (all-to-all over gloo) train the same model as every expert on every rank.
    for name in ("moe_fp32_power1", "moe_fp32_adamw"):
        replicated = moe_ep1_multinode[0][name]
        sharded = {k: v for r in moe_ep2 for k, v in r[name]["params"].items()}
        assert sharded.keys() == replicated["params"].keys()
        diff = torch.stack([(sharded[k] - replicated["params"][k]).norm() for k in sharded]).norm()
        assert diff.item() < FP32_TOL * update_norm(replicated)  # measured: 6e-7 to 2e-6


def test_split_args_moves_launcher_local_rank_behind_the_script():
    assert split_args(["--local_rank=1", "train.py", "--lr", "1"]) == (None, "train.py",
                                                                       ["--local_rank=1", "--lr", "1"])
    assert split_args(["--local-rank", "3", "-m", "pkg.train", "x"]) == ("pkg.train", "pkg.train",
                                                                         ["--local-rank", "3", "x"])


@pytest.mark.parametrize("argv, message", [([], "no training script given"), (["--local_rank=0"], "no training script"),
                                           (["-m"], "-m needs a module name"),
                                           (["missing.py"], "training script not found: missing.py")])
def test_runner_usage_error(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, "-m", "gradpower_ds.jobs.run", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and f"error: {message}" in proc.stderr
    assert "usage: python -m gradpower_ds.jobs.run" in proc.stderr


SCRIPT = """import json, sys
from gradpower_ds.deepspeed import is_registered
print(json.dumps(dict(name=__name__, argv=sys.argv, path0=sys.path[0], registered=is_registered())))
"""


@pytest.mark.parametrize("form", ["script", "module"])
def test_runner_runs_the_script_as_main_after_register(tmp_path, form):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "train.py").write_text(SCRIPT)
    target = ["pkg/train.py"] if form == "script" else ["-m", "pkg.train"]
    proc = subprocess.run([sys.executable, "-m", "gradpower_ds.jobs.run", "--local_rank=0", *target, "--x", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    check(proc, "python -m gradpower_ds.jobs.run")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # As `python pkg/train.py` / `python -m pkg.train` would: argv[0] and sys.path[0] (script folder / cwd).
    argv0 = "pkg/train.py" if form == "script" else str(tmp_path / "pkg" / "train.py")
    assert got["name"] == "__main__" and got["registered"]
    assert got["argv"] == [argv0, "--local_rank=0", "--x", "1"]
    assert os.path.realpath(got["path0"]) == os.path.realpath(tmp_path / "pkg" if form == "script" else tmp_path)
    assert "registered DeepSpeed optimizer types AdamPower/AdamWPower" in proc.stderr


FAKE_SSH = """#!/usr/bin/env bash
# stands in for ssh: logs its host (the word before the command), fails for hosts in $FAKE_SSH_DOWN
host="${@: -2:1}"
echo "$host" >> "$FAKE_SSH_LOG"
case " $FAKE_SSH_DOWN " in *" $host "*) echo "ssh: connect to host $host port 22: Connection refused" >&2; exit 255;; esac
"""


def multinode_sh(tmp_path, down="", **env) -> subprocess.CompletedProcess:
    """launch/multinode.sh train.py --x 1 with only `env` of its variables set, the launcher replaced by `echo`
    and ssh by FAKE_SSH (hosts in `down` refuse); the hosts asked by ssh are in tmp_path/ssh.log."""
    ours = ("HOSTFILE", "MASTER_ADDR", "MASTER_PORT", "NUM_GPUS", "NODE_RANK", "NO_SSH", "DS_ARGS")
    base = {k: v for k, v in os.environ.items() if k not in ours}
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(FAKE_SSH)
    fake.chmod(0o755)
    (tmp_path / "ssh.log").write_text("")
    base.update(PATH=f"{fake.parent}{os.pathsep}{base['PATH']}", FAKE_SSH_LOG=str(tmp_path / "ssh.log"),
                FAKE_SSH_DOWN=down, DEEPSPEED="echo")
    return subprocess.run(["bash", str(ROOT / "launch" / "multinode.sh"), "train.py", "--x", "1"], cwd=tmp_path,
                          env=dict(base, **{k: str(v) for k, v in env.items()}),
                          capture_output=True, text=True, timeout=60)


def ssh_asked(tmp_path) -> list[str]:
    """The hosts the last multinode_sh asked over ssh, in order."""
    return (tmp_path / "ssh.log").read_text().split()


def test_multinode_script_builds_the_deepspeed_command(tmp_path):
    (tmp_path / "hosts").write_text("a slots=2\n# a comment\n\nb slots=2\n")
    proc = multinode_sh(tmp_path, HOSTFILE="hosts", MASTER_ADDR="10.0.0.1", MASTER_PORT=1234, NUM_GPUS=2, NODE_RANK=1)
    check(proc, "multinode.sh")
    assert proc.stdout.split() == ["--hostfile", "hosts", "--master_port", "1234", "--master_addr", "10.0.0.1",
                                   "--num_gpus", "2", "--no_ssh", "--node_rank", "1",
                                   "--module", "gradpower_ds.jobs.run", "train.py", "--x", "1"]
    assert ssh_asked(tmp_path) == []  # by node: no ssh at all
    proc = multinode_sh(tmp_path, HOSTFILE="hosts")  # with ssh: DeepSpeed starts every node
    check(proc, "multinode.sh")
    assert proc.stdout.split() == ["--hostfile", "hosts", "--master_port", "29500",
                                   "--module", "gradpower_ds.jobs.run", "train.py", "--x", "1"]
    assert ssh_asked(tmp_path) == ["a", "b"]


def test_multinode_script_names_a_host_that_does_not_answer_ssh(tmp_path):
    (tmp_path / "hosts").write_text("a slots=2\nb slots=2\n")
    proc = multinode_sh(tmp_path, down="b", HOSTFILE="hosts")
    assert proc.returncode == 1 and proc.stdout == ""  # the launcher never ran
    assert "host b of hosts does not answer ssh" in proc.stderr and "Connection refused" in proc.stderr
    assert ssh_asked(tmp_path) == ["a", "b"]


@pytest.mark.parametrize("ds_args", ["--launcher openmpi", "--launcher=slurm"])
def test_multinode_script_asks_ssh_only_for_the_ssh_launcher(tmp_path, ds_args):
    (tmp_path / "hosts").write_text("a slots=2\nb slots=2\n")
    proc = multinode_sh(tmp_path, down="a b", HOSTFILE="hosts", DS_ARGS=ds_args)
    check(proc, "multinode.sh")
    words = proc.stdout.split()
    assert words[:words.index("--module")] == ["--hostfile", "hosts", "--master_port", "29500", *ds_args.split()]
    assert ssh_asked(tmp_path) == []


@pytest.mark.parametrize("env, message", [({}, "set HOSTFILE"), ({"HOSTFILE": "nope"}, "hostfile not found"),
                                          ({"HOSTFILE": "hosts", "NODE_RANK": 0}, "needs MASTER_ADDR"),
                                          ({"HOSTFILE": "hosts", "NO_SSH": 1}, "needs NODE_RANK")])
def test_multinode_script_errors(tmp_path, env, message):
    (tmp_path / "hosts").write_text("a slots=1\n")
    proc = multinode_sh(tmp_path, **env)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""
