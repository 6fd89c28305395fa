"""Gradient noise, measured from gradients a data-parallel job already has (issue 18: which p suits a run).

- The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of
  Large-Batch Training", appendix A): G is the true gradient, Sigma the per-example gradient covariance.
  From the squared norm of a gradient averaged over a small batch (``b_small`` examples, e.g. one rank's
  micro-batch) and over a big one (``b_big``, e.g. the global batch), E|g_b|^2 = |G|^2 + tr(Sigma) / b gives the
  unbiased estimates ``noise_terms`` returns. Each is noisy for one step; the paper smooths numerator and
  denominator separately and divides (``NoiseScale``).
- The per-coordinate signal-to-noise ratio |E g| / std(g) across the gradients of several batches (one row each),
  the quantity GradPower's analysis turns on: ``coordinate_snr``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def noise_terms(small_sq_norm: float, b_small: float, big_sq_norm: float, b_big: float) -> tuple[float, float]:
    """Unbiased estimates (|G|^2, tr Sigma) from |g_small|^2, the squared norm of a gradient averaged over `b_small`
    examples (for lower variance: the mean of several such squared norms), and |g_big|^2 over `b_big` > `b_small`.

    ValueError unless 0 < b_small < b_big.
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"noise_terms: needs 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


class NoiseScale:
    """B_simple from noisy per-step terms: exponential moving averages of |G|^2 and tr Sigma (weight `decay` on the
    past), divided. ``update`` takes one step's terms; ``value`` is None until |G|^2's average is positive."""

    def __init__(self, decay: float = 0.95):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"NoiseScale: invalid decay={decay!r}: must be in [0, 1)")
        self.decay = decay
        self.grad_sq = self.trace = None

    def update(self, grad_sq: float, trace: float) -> float | None:
        """Folds one step's (|G|^2, tr Sigma) estimates in; returns the current B_simple."""
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            raise ValueError(f"NoiseScale.update: non-finite terms ({grad_sq}, {trace})")
        if self.grad_sq is None:
            self.grad_sq, self.trace = grad_sq, trace
        else:
            self.grad_sq = self.decay * self.grad_sq + (1.0 - self.decay) * grad_sq
            self.trace = self.decay * self.trace + (1.0 - self.decay) * trace
        return self.value

    @property
    def value(self) -> float | None:
        """tr Sigma / |G|^2 of the averages (None while |G|^2's average is not positive)."""
        if self.grad_sq is None or self.grad_sq <= 0.0:
            return None
        return self.trace / self.grad_sq

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run continues the same averages."""
        return {"decay": self.decay, "grad_sq": self.grad_sq, "trace": self.trace}

    def load_state_dict(self, state: dict) -> None:
        """Continues the averages of `state` (``state_dict``)."""
        self.decay, self.grad_sq, self.trace = state["decay"], state["grad_sq"], state["trace"]


def coordinate_snr(samples: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Per coordinate, |mean| / std over the rows of `samples` (k >= 2 gradients of the same coordinates, one per
    batch; std with Bessel's correction), in float64; inf where std is 0 and the mean is not, 0 where both are."""
    rows = torch.stack(list(samples)) if not torch.is_tensor(samples) else samples
    if rows.dim() != 2 or rows.shape[0] < 2:
        raise ValueError(f"coordinate_snr: needs a (k >= 2, n) tensor of k gradients, got shape {tuple(rows.shape)}")
    rows = rows.double()
    mean, std = rows.mean(0).abs(), rows.std(0, unbiased=True)
    return torch.where(std > 0, mean / std.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.where(mean > 0, torch.full_like(mean, math.inf), torch.zeros_like(mean)))


NOISE_SAMPLES = 16384  # gradient coordinates a NoiseProbe samples per micro-batch (all of them in a smaller model)
LAYER_GROUPS = (("output", ("lm_head", "output_layer")), ("embedding", ("embed",)), ("norm", ("norm",)),
                ("attention", ("attn", "attention")), ("ffn", ("mlp", "moe", "ffn")))
"""The layer groups whose SNR is logged, each with the name fragments that place a parameter in it (first match)."""


def layer_group(name: str) -> str:
    """The LAYER_GROUPS group of a parameter name (ours, Hugging Face's or Megatron's), 'other' if none matches."""
    return next((group for group, keys in LAYER_GROUPS if any(k in name for k in keys)), "other")


class NoiseProbe:
    """Measures the gradient noise of a data-parallel step from the gradients it computes anyway.

    While ``active``, a tensor hook on every dense (non-expert) parameter copies each micro-batch's *local*
    gradient (this rank's, before any reduction or accumulation) at fixed random coordinates: NOISE_SAMPLES in
    all, spread over the tensors by size (stratified: each tensor's coordinates stand for its whole size). At the
    end of the step ``finish()`` all-gathers those rows from every rank: K = micro-batches x ranks gradients, each
    over `examples` examples, whose mean is the step's gradient. From them ``noise_terms`` gives |G|^2 and
    tr Sigma (small batch: one micro-batch; big batch: all K), and ``coordinate_snr`` the per-coordinate
    |mean| / std, whose median per layer group is reported over the coordinates that got a gradient (an
    embedding row of a token absent from the step gets none). Each step's estimate is noisy, the more so for
    a small K: average over many steps (``NoiseMonitor``). Expert parameters are left out: under expert
    parallelism a rank's expert gradient comes from other ranks' tokens too, so it is not one micro-batch's
    gradient. A factor on all the gradients (loss scale, 1 / gradient accumulation) cancels in B_simple and in
    the SNR.
    """

    def __init__(self, named_parameters, examples: int, samples: int = NOISE_SAMPLES, seed: int = 0):
        dense = [(n, p) for n, p in named_parameters if p.requires_grad and getattr(p, "allreduce", True)]
        sizes = [int(getattr(p, "ds_numel", p.numel())) for _, p in dense]  # ZeRO-3 partitions p itself
        total = sum(sizes)
        if not total:
            raise ValueError("NoiseProbe: the model has no dense (non-expert) parameter with a gradient")
        generator = torch.Generator().manual_seed(seed)
        self.examples, self.active, self._rows = examples, False, []
        self._slots, weights, groups, self._handles, offset = [], [], [], [], 0
        for (name, param), size in zip(dense, sizes):
            count = min(size, max(1, round(samples * size / total)))
            index = torch.randperm(size, generator=generator)[:count].sort().values.to(param.device)
            self._slots.append((offset, index))
            weights.append(torch.full((count,), size / count, dtype=torch.float64))
            groups.extend([layer_group(name)] * count)
            self._handles.append(param.register_hook(self._hook(len(self._slots) - 1)))
            offset += count
        self.width, self.weights = offset, torch.cat(weights)
        self.groups = {g: torch.tensor([i for i, h in enumerate(groups) if h == g]) for g in dict.fromkeys(groups)}

    def _hook(self, slot: int):
        def hook(grad):
            if self.active:
                offset, index = self._slots[slot]
                self._rows[-1][offset:offset + index.numel()] = grad.detach().reshape(-1).index_select(0, index)
        return hook

    def next_micro_batch(self, device) -> None:
        """Call before each backward of a measured step: the hooks fill a new row."""
        if self.active:
            self._rows.append(torch.zeros(self.width, dtype=torch.float32, device=device))

    def finish(self) -> dict | None:
        """Ends a measured step (all ranks): {"grad_sq", "trace", "snr": {group: median SNR}}, or None when fewer
        than 2 gradients were sampled or one is not finite (e.g. an fp16 overflow step)."""
        import torch.distributed as dist

        rows, self._rows, self.active = self._rows, [], False
        local = torch.stack(rows) if rows else torch.zeros(0, self.width)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local.contiguous())
            local = torch.cat(parts)
        samples = local.double().cpu()
        if samples.shape[0] < 2 or not torch.isfinite(samples).all():
            return None
        small = (samples.square() @ self.weights).mean().item()
        big = (samples.mean(0).square() @ self.weights).item()
        grad_sq, trace = noise_terms(small, self.examples, big, self.examples * samples.shape[0])
        snr, reached = coordinate_snr(samples), (samples != 0).any(0)
        medians = {g: snr[cols[reached[cols]]] for g, cols in self.groups.items()}
        return {"grad_sq": grad_sq, "trace": trace,
                "snr": {g: values.median().item() for g, values in medians.items() if values.numel()}}

    def remove(self) -> None:
        """Removes the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


NOISE_FIELDS = ("noise_scale", *(f"snr_{group}" for group, _ in LAYER_GROUPS))
"""The metrics.csv columns of a measured step: the smoothed B_simple (tokens) and each layer group's median SNR."""


class NoiseMonitor:
    """What a training job does with the noise: a NoiseProbe measuring every `every` steps (0: never), B_simple
    smoothed over the measured steps (``NoiseScale``, logged per measured step), the run's B_simple for the end
    line (``run_value``: the run's summed tr Sigma over its summed |G|^2, the aggregate McCandlish et al. use, so
    a step whose |G|^2 estimate is near zero cannot dominate it), and checkpoint state so a resumed run continues
    the same averages. `examples` is one rank's micro-batch in tokens, so B_simple is in tokens."""

    def __init__(self, named_parameters, examples: int, every: int, seed: int = 0):
        self.every = every
        self.probe = NoiseProbe(named_parameters, examples, seed=seed) if every else None
        self.scale, self.grad_sq, self.trace = NoiseScale(), 0.0, 0.0

    def begin_step(self, step: int) -> None:
        """Before step `step` (0-based) of the run: the probe samples it when step + 1 is a multiple of `every`."""
        if self.probe is not None:
            self.probe.active = (step + 1) % self.every == 0

    def next_micro_batch(self, device) -> None:
        """Before each backward."""
        if self.probe is not None:
            self.probe.next_micro_batch(device)

    def end_step(self) -> dict:
        """After the step (all ranks): the NOISE_FIELDS of a measured step ({} otherwise, or when it could not be
        measured)."""
        if self.probe is None or not self.probe.active:
            return {}
        measured = self.probe.finish()
        if measured is None:
            return {}
        value = self.scale.update(measured["grad_sq"], measured["trace"])
        self.grad_sq, self.trace = self.grad_sq + measured["grad_sq"], self.trace + measured["trace"]
        return {"noise_scale": value, **{f"snr_{g}": v for g, v in measured["snr"].items() if g != "other"}}

    @property
    def run_value(self) -> float | None:
        """The run's B_simple: summed tr Sigma / summed |G|^2 over its measured steps (None: none measured, or the
        summed |G|^2 is not positive)."""
        return self.trace / self.grad_sq if self.grad_sq > 0 else None

    def state_dict(self) -> dict:
        """The averages a checkpoint keeps (the client state of the main job's, the plain state of Megatron's)."""
        return {"scale": self.scale.state_dict(), "grad_sq": self.grad_sq, "trace": self.trace}

    def load_state_dict(self, state: dict) -> None:
        """Continues the averages of `state` (``state_dict``)."""
        self.scale.load_state_dict(state["scale"])
        self.grad_sq, self.trace = state["grad_sq"], state["trace"]
