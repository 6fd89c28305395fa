"""Everything that needs a CUDA GPU; skipped cleanly without one (CI). tests/gpu/check.sh runs it on a lent GPU.

Test names start with the check.sh step that runs them:

- kernel_: AdamPower through the functional core on CUDA tensors on every path (single-tensor,
  multi-tensor, the automatic choice, the Triton kernel) with fp32 and bf16 grads, against the CPU
  reference path; grad_power_ on CUDA (torch route and Triton) against the float64 reference on edge
  and wide-range values; Megatron's AdamPower class (megatron_patches.optimizer) on CUDA params; the
  gradient-noise probe (gradpower_ds.noise) on CUDA params against the CPU.
- deepspeed_: tests/jobs/ds_matrix.py on one GPU (nccl): ZeRO-2 bf16, ZeRO-2 fp16 with dynamic loss
  scaling, ZeRO-3 fp32 and ZeRO-2 bf16 with CPU offload (CPUAdamPower), each against the unsharded
  reference and, at power 1, DeepSpeed's own AdamW (FusedAdam / DeepSpeedCPUAdam), as on the CPU.
- main_job_: gradpower_ds.jobs.train on the GPU, and a stop at step 4 + resume that logs the same curve.
- megatron_: gradpower_ds.jobs.train_megatron on the GPU with AdamPower and GPAS, saved at iteration 3,
  then resumed from it.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import edge_tensor, grad_stream, torchrun
from gradpower_ds import adam_power, grad_power, grad_power_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).parent / "jobs"
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, power=1.2)
PATHS = {"single_tensor": dict(foreach=False), "multi_tensor": dict(foreach=True), "automatic": {},
         "triton": dict(fused=True)}


def _steps(device: str, grad_dtype: torch.dtype, options: dict, shapes=((10001,), (33, 17), (4096,))) -> list:
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(device) for i, s in enumerate(shapes)]
    streams = [grad_stream(s, 30, seed=10 + i) for i, s in enumerate(shapes)]
    moments = [(torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)) for p in params]
    for k in range(30):
        adam_power(params, [s[k].to(grad_dtype).to(device) for s in streams], [m for m, _, _ in moments],
                   [v for _, v, _ in moments], [t for _, _, t in moments], **HYPER, **options)
    return [p.cpu() for p in params]


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_adam_power_on_cuda_matches_cpu_reference(path, grad_dtype):
    reference = _steps("cpu", grad_dtype, PATHS["single_tensor"])
    for got, want in zip(_steps("cuda", grad_dtype, PATHS[path]), reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_torch_fused_path_on_cuda_matches_cpu_reference(grad_dtype, monkeypatch):
    """Without the Triton kernel (GRADPOWER_TRITON=0 here; no Triton or a failed gate for users) the automatic choice on
    CUDA is phi into the grads' copy, then torch's fused AdamW kernel."""
    from gradpower_ds import torch_paths

    monkeypatch.setenv("GRADPOWER_TRITON", "0")
    calls = []
    real = torch_paths.torch_fused_adam_power
    monkeypatch.setattr(torch_paths, "torch_fused_adam_power", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference = _steps("cpu", grad_dtype, PATHS["single_tensor"])
    for got, want in zip(_steps("cuda", grad_dtype, PATHS["automatic"]), reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(calls) == 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_gate_makes_triton_the_default_on_this_gpu(dtype, monkeypatch, tmp_path):
    """The per-GPU check passes here, in well under a second once Triton's cache is warm, and fused=None then
    takes the Triton kernel for CUDA tensors."""
    from gradpower_ds import kernel_gate
    from gradpower_ds.power import fused_kernel

    monkeypatch.delenv("GRADPOWER_TRITON", raising=False)
    device = torch.device("cuda", torch.cuda.current_device())
    for attempt in ("cold", "warm"):
        monkeypatch.setenv("GRADPOWER_CACHE_DIR", str(tmp_path / attempt))
        monkeypatch.setattr(kernel_gate, "_verdicts", {})
        assert fused_kernel(device, None, dtype) == "triton"
    verdict, = json.loads((tmp_path / "warm" / kernel_gate.CACHE_FILE).read_text()).values()
    assert verdict["passed"] and verdict["gpu"] == torch.cuda.get_device_name(device), verdict
    assert verdict["seconds"] < 1.0, verdict


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_noise_probe_on_cuda_matches_cpu(dtype):
    """gradpower_ds.noise.NoiseProbe on CUDA parameters (its rows on the GPU) measures what it measures on the CPU."""
    from gradpower_ds.noise import NoiseProbe

    def measure(device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        model = model.to(device, dtype)
        probe = NoiseProbe(model.named_parameters(), examples=8, samples=4096, seed=3)
        probe.active = True
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, y = torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen)
            probe.next_micro_batch(device)
            ((model(x.to(device, dtype)).float() - y.to(device)) ** 2).mean().backward()
        return probe.finish()

    cpu, gpu = measure("cpu"), measure("cuda")
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16: the two devices' matmuls round differently
    assert gpu["grad_sq"] == pytest.approx(cpu["grad_sq"], rel=tol) and gpu["trace"] == pytest.approx(cpu["trace"],
                                                                                                      rel=tol)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_grad_power_in_place_on_cuda(fused, dtype):
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(100_003, generator=gen) * 10.0 ** torch.randint(-20, 20, (100_003,), generator=gen).float()
    x = torch.cat([edge_tensor(), wide]).to(dtype)
    y = x.cuda()
    grad_power_(y, 1.2, fused=fused)
    ref = grad_power(x, 1.2)
    # fp32: the GPU's approximate log2/exp2 (~2 ulp of p*log2|g|, up to ~126) for Triton; powf with p rounded to
    # fp32 for torch. bf16/fp16: fp32 maths, then one rounding.
    rtol = (3e-5 if fused else 5e-6) if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(y.cpu(), ref, rtol=rtol, atol=2.0**-149, equal_nan=True)


def test_kernel_megatron_adampower_class_on_cuda():
    """torch's AdamW moved to Megatron's AdamPower class steps CUDA params like the CPU reference."""
    from megatron_patches.optimizer import power_optimizer_class

    results = []
    for device, cls in (("cpu", torch.optim.AdamW), ("cuda", power_optimizer_class(torch.optim.AdamW, 1.2, 1.5))):
        dense = torch.nn.Parameter(torch.linspace(-1, 1, 4097, device=device))
        expert = torch.nn.Parameter(torch.linspace(2, -2, 1000, device=device))
        opt = cls([{"params": [dense], "is_expert_parallel": False}, {"params": [expert], "is_expert_parallel": True}],
                  lr=1e-2, weight_decay=0.1, foreach=False if device == "cpu" else None)
        for k, (gd, ge) in enumerate(zip(grad_stream(4097, 10, seed=1), grad_stream(1000, 10, seed=2))):
            if device == "cpu":  # the reference: AdamW on the float64-powered grads
                gd, ge = grad_power(gd, 1.2), grad_power(ge, 1.5)
            dense.grad, expert.grad = gd.to(device), ge.to(device)
            opt.step()
        results.append([dense.detach().cpu(), expert.detach().cpu()])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kernel_megatron_clip_fold_on_cuda():
    """Megatron's AdamPower class with a folded clip coefficient (a device tensor the kernel reads) steps like it on
    the grads scaled first; the folded one is TE's FusedAdam moved there where TE is installed (its own state
    stepped by the fused kernel), else torch's AdamW."""
    from megatron_patches.optimizer import power_optimizer_class

    try:
        from transformer_engine.pytorch.optimizers import FusedAdam as folded_base
    except ImportError:
        folded_base = torch.optim.AdamW
    results = []
    for base, fold in ((folded_base, True), (torch.optim.AdamW, False)):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 4097, device="cuda"))
        opt = power_optimizer_class(base, 1.2, 1.2)([param], lr=1e-2, weight_decay=0.1)
        for g in grad_stream(4097, 5, seed=3):
            param.grad = g.cuda() if fold else g.cuda() * 0.5
            if fold:
                opt.fold_into_next_step(grad_scale=torch.full((1,), 0.5, device="cuda"))
            opt.step()
        results.append(param.detach().cpu())
    assert results[0].ne(torch.linspace(-1, 1, 4097)).any()
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_kernel_step_refuses_cuda_graph_capture():
    """A captured AdamPower step would replay one step's host-side bias corrections: refused, saying so."""
    from gradpower_ds import AdamPower

    param = torch.nn.Parameter(torch.ones(1024, device="cuda"))
    param.grad = torch.ones_like(param)
    opt = AdamPower([param], fused=True)
    opt.step()  # states and plan made outside the capture, as a graph's warm-up would
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            opt.step()


GPU_CASES = [(2, "bf16", False, False), (2, "fp16", False, False), (3, "fp32", False, False), (2, "bf16", True, False)]


def test_deepspeed_on_one_gpu(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    from jobs import ds_toy
    from test_deepspeed_matrix import check_case

    out = tmp_path / "results.pt"
    torchrun(JOBS / "ds_matrix.py", out, *[ds_toy.case_name(*case) for case in GPU_CASES], nproc=1, timeout=600)
    results = torch.load(out)
    for case in GPU_CASES:
        offload = case[2]
        check_case(results, case, world=1, ours_class="CPUAdamPower" if offload else "AdamPower",
                   adamw_class="DeepSpeedCPUAdam" if offload else "FusedAdam")


MUON_GPU_CASES = ["z0-fp32", "z2-bf16", "z3-fp32"]


def test_deepspeed_muon_power_on_one_gpu(tmp_path):
    """MuonPower on a GPU (nccl; DeepSpeed's Newton-Schulz in fp16 there): p = 1 is DeepSpeed's Muon bit for bit, the
    power lands within the bf16 tolerance of the CPU reference (whose Newton-Schulz is fp32), resume is exact."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    from jobs import ds_muon
    from test_deepspeed_muon import LOW_PRECISION_TOL, reference, update_rel_error

    out = tmp_path / "results.pt"
    torchrun(JOBS / "ds_muon.py", out, *MUON_GPU_CASES, nproc=1, timeout=600)
    results = torch.load(out)
    for name in MUON_GPU_CASES:
        stage, dtype = int(name[1]), name.split("-")[1]
        ours, ours_p1, muon = (results[(name, label)] for label in ("power", "power1", "ds_muon"))
        assert ours["optimizer"] == "MuonPower" and ours["aux"] == "AdamPower"
        for key in muon["params"]:
            assert torch.equal(ours_p1["params"][key], muon["params"][key]), (name, key)
        want = reference(dtype, stage == 0, world=1)
        error = update_rel_error(ours["params"], want)
        assert error <= LOW_PRECISION_TOL and update_rel_error(muon["params"], want) > 2.5 * error, name
        if name in ds_muon.RESUME_CASES:
            resumed = results[(name, "resumed")]["params"]
            assert all(torch.equal(resumed[k], ours["params"][k]) for k in resumed), name


def test_main_job_on_gpu_resumes_exactly(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    from gradpower_ds.jobs.metrics import read_metrics
    from test_train import deepspeed_train

    whole, split = tmp_path / "whole", tmp_path / "split"
    proc = deepspeed_train(whole, nproc=1)
    assert "1 ranks, ZeRO-2, bf16, adampower p=1.2 | AdamPower" in proc.stdout + proc.stderr
    deepspeed_train(split, "--stop_at", "4", nproc=1)
    deepspeed_train(split, "--resume", "true", nproc=1)
    rows_whole, rows_split = read_metrics(whole / "metrics.csv"), read_metrics(split / "metrics.csv")
    assert [r["step"] for r in rows_whole] == list(range(1, 9))
    for key in ("step", "tokens", "train_loss", "val_loss", "lr"):
        assert [r[key] for r in rows_split] == [r[key] for r in rows_whole], key
    assert rows_whole[0]["train_loss"] > rows_whole[-1]["train_loss"]


def test_megatron_pretrain_on_gpu_with_adampower_and_gpas(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from test_megatron_pretrain import CONFIGS, TINY, metrics

    common = ["-m", "gradpower_ds.jobs.train_megatron", *TINY, "--gradpower-config",
              str(CONFIGS / "adampower_moe_expert_p.json"), "--bf16", "--use-distributed-optimizer",
              "--train-iters", "6"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    first = torchrun(*common, "--save", full, "--save-interval", "3", nproc=1, timeout=600)
    log = first.stdout + first.stderr
    assert "megatron_patches: AdamPower (gradpower_p=1.2, gradpower_p_expert=1.1) on DistributedOptimizer" in log
    assert re.search(r"megatron_patches: GradPower step on (AdamWPower|FusedAdamPower): phi_p \(p=1\.2, expert "
                     r"p=1\.1\)", log), log[-3000:]
    second = torchrun(*common, "--save", resumed, "--load", full, "--ckpt-step", "3", nproc=1, timeout=600)
    assert "resumed at iteration 3" in second.stdout + second.stderr
    before, after = metrics(full), metrics(resumed)
    assert float(before[6]["train_loss"]) < float(before[1]["train_loss"])
    for step in (4, 5, 6):  # GPU kernels may reduce in a different order run to run: equal to 1e-3, not bitwise
        assert abs(float(after[step]["train_loss"]) - float(before[step]["train_loss"])) <= \
            1e-3 * abs(float(before[step]["train_loss"])), (step, after[step], before[step])
