"""gradpower_ds.noise against closed-form cases: synthetic gradients with known mean and covariance."""

import math

import pytest
import torch

from gradpower_ds.noise import NoiseMonitor, NoiseProbe, NoiseScale, coordinate_snr, layer_group, noise_terms


@pytest.mark.parametrize("grad_sq, trace, b_small, b_big", [(1.0, 10.0, 1, 8), (0.02, 3.5, 4, 64), (5.0, 0.0, 2, 3)])
def test_noise_terms_invert_the_expected_norms(grad_sq, trace, b_small, b_big):
    """E|g_b|^2 = |G|^2 + tr(Sigma) / b: given those expectations, the estimates are exact."""
    small, big = grad_sq + trace / b_small, grad_sq + trace / b_big
    got = noise_terms(small, b_small, big, b_big)
    assert got == pytest.approx((grad_sq, trace), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dim, b_small, ranks", [(64, 2, 4), (200, 8, 2)])
def test_noise_scale_of_synthetic_gradients(dim, b_small, ranks):
    """Per-example gradients mu + L z with known mu and Sigma = L L^T: the averaged estimates find |mu|^2, tr(Sigma)
    and B_simple = tr(Sigma) / |mu|^2 within a few standard errors; small batches as a data-parallel job has them
    (each rank's micro-batch), the big one their mean."""
    gen = torch.Generator().manual_seed(dim)
    mu = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.3
    scale = torch.linspace(0.5, 2.0, dim, dtype=torch.float64)
    mix = torch.eye(dim, dtype=torch.float64) + 0.1 * torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    chol = mix * scale  # Sigma = chol @ chol.T
    trace, grad_sq = (chol**2).sum().item(), (mu**2).sum().item()
    steps, b_big = 2000, b_small * ranks
    terms = []
    for _ in range(steps):
        examples = mu + torch.randn(b_big, dim, generator=gen, dtype=torch.float64) @ chol.T
        small = examples.view(ranks, b_small, dim).mean(1)
        small_sq = (small**2).sum(1).mean().item()
        big_sq = (examples.mean(0) ** 2).sum().item()
        terms.append(noise_terms(small_sq, b_small, big_sq, b_big))
    est = torch.tensor(terms, dtype=torch.float64)
    mean, stderr = est.mean(0), est.std(0) / math.sqrt(steps)
    assert abs(mean[0].item() - grad_sq) < 4 * stderr[0].item(), (mean[0].item(), grad_sq, stderr[0].item())
    assert abs(mean[1].item() - trace) < 4 * stderr[1].item(), (mean[1].item(), trace, stderr[1].item())
    noise = NoiseScale(decay=0.0)
    noise.update(mean[0].item(), mean[1].item())
    assert noise.value == pytest.approx(trace / grad_sq, rel=0.05)


def test_noise_terms_refuse_batches_out_of_order():
    with pytest.raises(ValueError, match=r"needs 0 < b_small < b_big, got b_small=8, b_big=8"):
        noise_terms(1.0, 8, 1.0, 8)


def test_noise_scale_averages_and_resumes():
    noise = NoiseScale(decay=0.5)
    assert noise.value is None
    assert noise.update(-1.0, 4.0) is None  # a negative |G|^2 estimate (possible for one step) gives no value yet
    assert noise.update(3.0, 8.0) == pytest.approx(6.0 / 1.0)  # averages: |G|^2 (-1 + 3) / 2, tr (4 + 8) / 2
    saved = noise.state_dict()
    resumed = NoiseScale()
    resumed.load_state_dict(saved)
    assert resumed.update(2.0, 2.0) == noise.update(2.0, 2.0)
    with pytest.raises(ValueError, match=r"invalid decay=1"):
        NoiseScale(decay=1)
    with pytest.raises(ValueError, match="non-finite"):
        noise.update(float("nan"), 1.0)


def test_coordinate_snr_closed_form_and_edges():
    # two rows m - d, m + d: mean m, std (Bessel) d * sqrt(2)
    m = torch.tensor([0.5, -2.0, 0.0, 3.0, 0.0])
    d = torch.tensor([0.25, 1.0, 1.0, 0.0, 0.0])
    snr = coordinate_snr(torch.stack([m - d, m + d]))
    expected = torch.tensor([0.5 / (0.25 * math.sqrt(2)), 2.0 / math.sqrt(2), 0.0, math.inf, 0.0], dtype=torch.float64)
    assert torch.allclose(snr, expected, rtol=1e-12)
    gen = torch.Generator().manual_seed(1)
    rows = torch.tensor([1.0, -0.5]) + torch.tensor([2.0, 0.25]) * torch.randn(20000, 2, generator=gen)
    assert coordinate_snr(rows).tolist() == pytest.approx([0.5, 2.0], rel=0.03)
    assert coordinate_snr([torch.ones(3), torch.ones(3).bfloat16().float() * 3]).dtype == torch.float64
    with pytest.raises(ValueError, match=r"needs a \(k >= 2, n\) tensor of k gradients, got shape \(1, 3\)"):
        coordinate_snr(torch.ones(1, 3))


class _Model(torch.nn.Module):
    """Linear least squares with an 'expert' tensor (allreduce=False, as DeepSpeed and Megatron mark theirs)."""

    def __init__(self, dim: int):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(dim, dim) * 0.1)
        self.attn = torch.nn.Linear(dim, dim)
        self.expert = torch.nn.Parameter(torch.randn(dim))
        self.expert.allreduce = False

    def forward(self, x, y):
        return ((self.attn(x @ self.embed) + self.expert - y) ** 2).mean()


def _micro_batches(dim: int, k: int, b: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, dim, generator=gen), torch.randn(b, dim, generator=gen)) for _ in range(k)]


def _direct_terms(model, batches, b):
    """|G|^2 and tr(Sigma) from the full micro-batch gradients of the dense parameters (float64), by noise_terms."""
    dense = [model.embed, model.attn.weight, model.attn.bias]
    grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(x, y), dense)]).double() for x, y in batches]
    small = torch.stack([g.square().sum() for g in grads]).mean().item()
    big = torch.stack(grads).mean(0).square().sum().item()
    return noise_terms(small, b, big, b * len(batches))


@pytest.mark.parametrize("k", [2, 5])
def test_probe_equals_the_direct_estimate_when_it_samples_every_coordinate(k):
    """A model smaller than NOISE_SAMPLES: the probe sees every dense coordinate of each micro-batch's gradient
    (through its hooks, during the backward a job runs anyway), so its terms equal the direct ones; the expert
    tensor is left out, and inactive steps record nothing."""
    torch.manual_seed(0)
    model, b = _Model(6), 3
    batches = _micro_batches(6, k, b)
    expected = _direct_terms(model, batches, b)
    probe = NoiseProbe(model.named_parameters(), examples=b)
    assert probe.width == 6 * 6 + 6 * 6 + 6  # embed, attn weight and bias; not the expert
    for x, y in batches:  # inactive: the hooks record nothing
        probe.next_micro_batch("cpu")
        model(x, y).backward()
    assert probe._rows == []
    probe.active = True
    for x, y in batches:
        probe.next_micro_batch("cpu")
        model.zero_grad()
        model(x, y).backward()
    measured = probe.finish()
    assert (measured["grad_sq"], measured["trace"]) == pytest.approx(expected, rel=1e-5)
    assert set(measured["snr"]) == {"embedding", "attention"} and not probe.active
    probe.remove()
    assert not model.embed._backward_hooks


def test_probe_sampling_is_unbiased_over_seeds():
    """Fewer samples than coordinates: each seed's coordinates stand for their tensors (stratified), so the mean
    over seeds of the sampled terms approaches the direct ones."""
    torch.manual_seed(1)
    model, b = _Model(32), 4
    batches = _micro_batches(32, 4, b, seed=1)
    expected = _direct_terms(model, batches, b)
    got = []
    for seed in range(200):
        probe = NoiseProbe(model.named_parameters(), examples=b, samples=256, seed=seed)
        assert abs(probe.width - 256) <= 3  # rounded per tensor
        probe.active = True
        for x, y in batches:
            probe.next_micro_batch("cpu")
            model(x, y).backward()
        measured = probe.finish()
        got.append((measured["grad_sq"], measured["trace"]))
        probe.remove()
    mean = torch.tensor(got, dtype=torch.float64).mean(0)
    assert mean[0].item() == pytest.approx(expected[0], rel=0.1)
    assert mean[1].item() == pytest.approx(expected[1], rel=0.05)


def test_probe_needs_two_gradients_and_finite_ones():
    model = _Model(4)
    probe = NoiseProbe(model.named_parameters(), examples=2)
    probe.active = True
    probe.next_micro_batch("cpu")
    model(*_micro_batches(4, 1, 2)[0]).backward()
    assert probe.finish() is None  # one micro-batch on one rank: no spread to measure
    probe.active = True
    for x, y in _micro_batches(4, 2, 2):
        probe.next_micro_batch("cpu")
        (model(x, y) * float("inf")).backward()
    assert probe.finish() is None  # e.g. an fp16 overflow step
    with pytest.raises(ValueError, match="no dense"):
        NoiseProbe([("expert", model.expert)], examples=2)


def test_monitor_measures_every_n_steps_and_resumes():
    """NoiseMonitor: measured steps only, the smoothed B_simple and the run mean in its state; a monitor loaded from
    that state continues exactly as the uninterrupted one."""
    torch.manual_seed(2)
    model, b = _Model(5), 2

    def run(monitor, steps):
        rows = []
        for step in steps:
            monitor.begin_step(step)
            for x, y in _micro_batches(5, 3, b, seed=step):
                monitor.next_micro_batch("cpu")
                model(x, y).backward()
            rows.append(monitor.end_step())
        return rows

    whole = NoiseMonitor(model.named_parameters(), b, every=2)
    rows = run(whole, range(6))
    assert [bool(r) for r in rows] == [False, True, False, True, False, True]
    assert set(rows[1]) == {"noise_scale", "snr_embedding", "snr_attention"} and rows[1]["noise_scale"] > 0
    first = NoiseMonitor(model.named_parameters(), b, every=2)
    run(first, range(4))
    resumed = NoiseMonitor(model.named_parameters(), b, every=2)
    resumed.load_state_dict(first.state_dict())
    assert run(resumed, range(4, 6)) == rows[4:] and resumed.run_value == whole.run_value
    # the run's B_simple: the summed tr Sigma over the summed |G|^2 of its measured steps (1, 3, 5)
    terms = []
    for step in (1, 3, 5):
        probe = NoiseProbe(model.named_parameters(), b)
        probe.active = True
        for x, y in _micro_batches(5, 3, b, seed=step):
            probe.next_micro_batch("cpu")
            model(x, y).backward()
        terms.append(probe.finish())
        probe.remove()
    assert whole.run_value == pytest.approx(sum(t["trace"] for t in terms) / sum(t["grad_sq"] for t in terms))
    assert NoiseMonitor(model.named_parameters(), b, every=0).end_step() == {}


def test_layer_groups_of_the_three_stacks_names():
    assert [layer_group(n) for n in ("embed.weight", "layers.0.attn.q_proj.weight", "layers.1.mlp.moe.gate.wg.weight",
                                     "layers.0.norm1.weight", "lm_head.weight", "layers.0.gpas_gate.alpha")] == \
        ["embedding", "attention", "ffn", "norm", "output", "other"]
    assert [layer_group(n) for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                     "model.layers.0.mlp.up_proj.weight", "model.norm.weight")] == \
        ["embedding", "attention", "ffn", "norm"]
    assert [layer_group(n) for n in ("embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv"
                                     ".weight", "decoder.layers.0.pre_mlp_layernorm.weight", "output_layer.weight")] \
        == ["embedding", "attention", "norm", "output"]


def test_snr_is_taken_over_the_coordinates_that_got_a_gradient():
    """An embedding row of a token absent from the step gets no gradient: the group's median leaves it out."""
    torch.manual_seed(3)
    embed = torch.nn.Embedding(100, 4)
    probe = NoiseProbe([("embed.weight", embed.weight)], examples=2)
    probe.active = True
    for k in range(3):  # only tokens 0-4 occur
        probe.next_micro_batch("cpu")
        (embed(torch.tensor([k, k + 1, 4])) ** 2).sum().backward()
    snr = probe.finish()["snr"]["embedding"]
    assert snr > 0  # over all 400 coordinates the median would be 0
