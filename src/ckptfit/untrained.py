"""Find tensors that still hold a fresh initialisation: "loaded but untrained", after any loader.

The commonest silent failure after loading is a layer left at its random init (``strict=False``,
a loader that matched nothing, a renamed head). Training leaves a recognisable trace: values
that are no longer exactly constant, no longer an i.i.d. sample of the simple distribution
that ``reset_parameters`` (or a library's ``_init_weights``) draws from. This module tests each
tensor of a model against those distributions and reports the ones that still fit.

Evidence per tensor, strongest first:

- **constant**: every value exactly equal (norm weights are exactly 1 and biases exactly 0 at
  init; a trained one is practically never exactly constant). Norm layers (BatchNorm, LayerNorm,
  GroupNorm, RMSNorm and look-alikes) and their running statistics are tested *only* this way.
- **weight norm at init**: a ``weight_g`` / ``original0`` that equals the norm of its direction
  tensor, as ``weight_norm`` sets it.
- **PyTorch's default**: the exact distribution of the module type, with its parameters from
  the shape: ``U(±1/sqrt(fan_in))`` for Linear/Conv weights and biases (kaiming_uniform with
  a=sqrt(5)), ``U(±1/sqrt(hidden))`` for RNNs, xavier-uniform for ``in_proj_weight``, ``N(0, 1)``
  for Embedding: a Kolmogorov-Smirnov test against that distribution, plus the bound.
- **a library's random init**: a zero-mean normal, uniform or truncated normal whose scale is
  fitted (timm's ``trunc_normal_(std=.02)``, transformers' ``normal_(std=initializer_range)``,
  torchvision's ``kaiming_normal_``): a KS test, plus a test that the largest value is not an
  outlier for that normal (training grows heavy tails, which a KS test alone would miss).

Each distribution is tested on its mean, spread (when the scale is known) and kurtosis as well
as by KS: a trained tensor whose spread moved but whose shape stayed bell-like passes KS alone on
a few hundred values. A matrix (two or more dimensions of size > 1) must also look like an
i.i.d. draw, whatever its distribution: every init above draws each value independently, so its
rows (output units) share one mean and one mean square, so do its columns (inputs), and
neighbouring values are uncorrelated. Training breaks exactly this: units grow apart in norm,
inputs differ in use, filters become smooth. This second, distribution-free test rejects most
trained matrices outright, small ones included, where a test of the values' distribution alone
has little power.

A tensor is reported when one hypothesis is not rejected (p-value >= ``alpha``) and, for a
matrix, the i.i.d. test is not either (p-value >= ``ALPHA_IID``); the smaller p-value and the
number of values tested are its confidence. Tensors with fewer than ``MIN_VALUES``
values that are not constant cannot be told apart and are counted as undecided (below
``MIN_RANDOM`` values only PyTorch's exact default distribution is tested).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .keyfolding import fold_keys

__all__ = ["InitFinding", "UntrainedReport", "find_untrained", "ks_pvalue"]

MIN_VALUES = 16         # fewer values than this (and not constant): undecided
MIN_RANDOM = 100        # fewer values than this: only PyTorch's exact default is tested, else undecided
MAX_SAMPLE = 20_000     # values tested per tensor (a random sample of bigger tensors)
ALPHA_EXACT = 1e-3      # PyTorch's default distribution, parameters known from the shape
ALPHA_FITTED = 1e-2     # a library's distribution, scale fitted to the values (a weaker test)
MIN_FITTED = 4096       # values needed to test a distribution whose scale is fitted (any std)
ALPHA_OUTLIER = 1e-4    # the largest value of a normal sample this far out: grown by training
ALPHA_IID = 1e-3        # rows, columns and neighbours of a matrix this unalike: not an i.i.d. draw
MAX_IID = 1 << 20       # values the i.i.d. tests read (whole rows, every k-th row of bigger tensors)
MIN_GROUP = 8           # values per row (column) for the rows (columns) to be compared

_NORM_TYPES: tuple[type, ...] = tuple(t for t in (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None),
    nn.LocalResponseNorm, nn.CrossMapLRN2d) if isinstance(t, type))
_NORM_LEAVES = {"weight", "bias", "running_mean", "running_var"}


@dataclass(frozen=True)
class InitFinding:
    """One tensor that looks like a fresh init.

    Attributes:
        name: the tensor's name in the model (``layer1.0.conv1.weight``).
        module: the class of the module holding it.
        kind: the distribution it fits (the group it is listed under), e.g. ``exactly 1``.
        evidence: the numbers behind it: the test, its p-value, the bound.
        p_value: the test's p-value (1.0 for exact constants): how well the values fit.
        numel: how many values the tensor has.
        confidence: ``certain`` (exact constants, weight norm), ``high`` (a test on >= 1000
            values, or >= 100 against PyTorch's exact distribution), ``moderate`` otherwise.
    """

    name: str
    module: str
    kind: str
    evidence: str
    p_value: float
    numel: int
    confidence: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "module": self.module, "kind": self.kind, "evidence": self.evidence,
                "p_value": self.p_value, "numel": self.numel, "confidence": self.confidence}


@dataclass(frozen=True)
class UntrainedReport:
    """Outcome of :func:`find_untrained`.

    Attributes:
        flagged: the tensors that look like a fresh init, in model order.
        checked: the names of every tensor tested (parameters, and norm running statistics).
        undecided: tensors too small to tell (fewer than ``MIN_VALUES`` values, not constant).
    """

    flagged: tuple[InitFinding, ...]
    checked: tuple[str, ...]
    undecided: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        """The flagged tensors' names."""
        return [f.name for f in self.flagged]

    def groups(self) -> dict[str, list[InitFinding]]:
        """Flagged tensors grouped by the distribution they fit, in order of first appearance."""
        out: dict[str, list[InitFinding]] = {}
        for f in self.flagged:
            out.setdefault(f.kind, []).append(f)
        return out

    def __str__(self) -> str:
        n, total = len(self.flagged), len(self.checked)
        small = f"; {len(self.undecided)} too small to tell" if self.undecided else ""
        if not n:
            return f"at init: none of {total} tensors looks like a fresh init{small}"
        lines = [f"at init: {n} of {total} tensors look like a fresh init, not trained{small}:"]
        for kind, items in self.groups().items():
            conf = sorted({f.confidence for f in items}, key=["certain", "high", "moderate"].index)
            p = min(f.p_value for f in items)
            how = "certain" if conf == ["certain"] else f"{'/'.join(conf)}, p >= {p:.2g}"
            lines.append(f"  {kind} ({len(items)}, {how}): {', '.join(fold_keys(f.name for f in items))}")
        if n <= 3:
            lines += [f"    {f.name}: {f.evidence}" for f in self.flagged]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"flagged": [f.to_dict() for f in self.flagged], "checked": len(self.checked),
                "undecided": list(self.undecided)}


# ------------------------------------------------------------------------------------ statistics

def ks_pvalue(d: float, n: int) -> float:
    """P(D_n >= d) for the two-sided Kolmogorov-Smirnov statistic of ``n`` i.i.d. values.

    Stephens' approximation ``Q((sqrt(n) + 0.12 + 0.11/sqrt(n)) d)``, with ``Q`` the Kolmogorov
    survival function; accurate to about 1% for n >= 8, enough to tell fit from misfit.

    Example:
        >>> round(ks_pvalue(0.0, 100), 3), ks_pvalue(0.5, 100) < 1e-9
        (1.0, True)
    """
    if n <= 0:
        return 1.0
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, 2 * total))


def _ks(sorted_x: torch.Tensor, cdf: torch.Tensor) -> float:
    """The KS statistic of sorted values against their model CDF values."""
    n = sorted_x.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


def _phi(x: torch.Tensor | float) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.special.ndtr(x)
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _tn_var_ratio(t: float) -> float:
    """Var / c^2 of N(0, s) truncated to [-c, c] with t = c / s (1/3 as t -> 0: uniform)."""
    if t < 1e-3:
        return 1 / 3
    z = 2 * _phi(t) - 1
    dens = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    return (1 - 2 * t * dens / z) / (t * t)


def _fit_truncation(ratio: float) -> float | None:
    """t = c / s with ``_tn_var_ratio(t) == ratio``; None when the values are not bell- or box-shaped."""
    if ratio >= 1 / 3 or ratio <= 0:
        return None
    lo, hi = 1e-3, 60.0
    if _tn_var_ratio(hi) > ratio:
        return None
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _tn_var_ratio(mid) > ratio else (lo, mid)
    return math.sqrt(lo * hi)


@dataclass
class _Sample:
    x: torch.Tensor        # sorted float64 sample
    n: int                 # values in the whole tensor
    amax: float            # max |value| over the whole tensor
    m2: float              # mean of squares over the sample
    m4: float              # mean of fourth powers over the sample
    mean: float
    dtype: torch.dtype


def _sample(t: torch.Tensor) -> _Sample:
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n > MAX_SAMPLE:  # every step-th value: a sample without replacement (with it, the tests would see
        step = n // MAX_SAMPLE  # the tensor's own sampling noise twice and reject fresh tensors too often)
        part = flat[: step * MAX_SAMPLE : step]
    else:
        part = flat
    x = part.to("cpu", torch.float64).sort().values
    mag = flat.abs()
    clamped = mag == 2.0  # torch.nn.init.trunc_normal_ clamps to its default a=-2, b=2, where rounding puts a few
    if bool(clamped.any()) and int(clamped.sum()) <= 3 + n // 100_000:
        mag = mag[~clamped]
        x = x[x.abs() != 2.0]
    amax = float(mag.max()) if mag.numel() else 0.0
    x2 = x * x
    return _Sample(x, n, amax, float(x2.mean()), float((x2 * x2).mean()), float(x.mean()), t.dtype)


def _slack(dtype: torch.dtype) -> float:
    """Relative rounding of a value stored in ``dtype`` (a bound is checked with this much room)."""
    return {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 1e-6)


# Excess kurtosis of each family, and n * Var(sample kurtosis) (delta method on the moments).
_KURTOSIS = {"normal": (0.0, 24.0), "uniform": (-1.2, 1.3166), "truncated": (-0.6345, 3.8482)}


def _shape_p(s: _Sample, family: str, std: float, p_ks: float, *, scale_known: bool = True) -> float:
    """Combine the KS p-value with tests of the mean, spread and kurtosis of ``family`` (Bonferroni).

    KS looks at the middle of the distribution and is weak against a wrong scale; training shows
    as a spread that moved from the init's (a tensor that is only narrower or wider than the
    hypothesis, but still bell-shaped, passes KS on a few hundred values), in the tails
    (kurtosis) and as an offset (mean). Each of these is a separate test that a fresh tensor
    passes with probability 1 - p; the spread is tested only when ``std`` was not fitted to the
    values themselves (``scale_known``).
    """
    k = s.x.numel()
    z_mean = abs(s.mean) / (std / math.sqrt(k))
    k0, var = _KURTOSIS[family]
    z_kurt = abs(s.m4 / (s.m2 * s.m2) - 3 - k0) / math.sqrt(var / k) if s.m2 > 0 else math.inf
    ps = [p_ks, 2 * (1 - _phi(min(z_mean, 30.0))), 2 * (1 - _phi(min(z_kurt, 30.0)))]
    if scale_known:  # the mean square m2 of k values has variance (kurtosis + 2) * std**4 / k
        z_var = abs(s.m2 / (std * std) - 1) / math.sqrt((k0 + 2) / k)
        ps.append(2 * (1 - _phi(min(z_var, 30.0))))
    return min(1.0, len(ps) * min(ps))


def _uniform_p(s: _Sample, b: float) -> float:
    if s.amax > b * (1 + _slack(s.dtype)):
        return 0.0
    p = ks_pvalue(_ks(s.x, ((s.x + b) / (2 * b)).clamp(0, 1)), s.x.numel())
    return _shape_p(s, "uniform", b / math.sqrt(3), p)


def _normal_p(s: _Sample, sigma: float, *, scale_known: bool = True) -> float:
    """KS, mean, spread and kurtosis against N(0, sigma); 0 when the largest value is an outlier for ``n`` draws."""
    u = s.amax / sigma
    tail = 2 * (1 - _phi(u)) if u < 8 else 2 * math.exp(-u * u / 2) / (u * math.sqrt(2 * math.pi))
    if s.n * tail < ALPHA_OUTLIER:
        return 0.0
    return _shape_p(s, "normal", sigma, ks_pvalue(_ks(s.x, _phi(s.x / sigma)), s.x.numel()), scale_known=scale_known)


def _fitted(s: _Sample) -> tuple[float, str, str] | None:
    """The best of a zero-mean normal, uniform and truncated normal with a fitted scale."""
    k = s.x.numel()
    sd = math.sqrt(s.m2)
    if sd == 0 or abs(s.mean) > 5 * sd / math.sqrt(k):  # not centred on zero
        return None
    best: tuple[float, str, str] | None = None

    def consider(p: float, kind: str, text: str) -> None:
        nonlocal best
        if best is None or p > best[0]:
            best = (p, kind, text)

    p = _normal_p(s, sd, scale_known=False)
    consider(p, "random normal N(0, σ)", f"N(0, {sd:.3g}) fitted: p={p:.2g}, max |x| {s.amax / sd:.1f}σ")
    b = s.amax * (s.n + 1) / s.n
    p = _uniform_p(s, b)
    consider(p, "random uniform U(±b)", f"U(±{b:.3g}) fitted: p={p:.2g}")
    t = _fit_truncation(s.m2 / (s.amax * s.amax))
    if t is not None and 0.3 < t < 4:
        sig = s.amax / t
        z = 2 * _phi(t) - 1
        cdf = ((_phi(s.x / sig) - _phi(-t)) / z).clamp(0, 1)
        p = ks_pvalue(_ks(s.x, cdf), k)
        z_mean = abs(s.mean) / (math.sqrt(s.m2) / math.sqrt(k))
        p = min(1.0, 2 * min(p, 2 * (1 - _phi(min(z_mean, 30.0)))))
        consider(p, "random truncated normal", f"N(0, {sig:.3g}) cut at ±{t:.2f}σ fitted: p={p:.2g}")
    return best


def _chi2_sf(q: float, df: int) -> float:
    """P(X >= q) for X ~ chi-square with ``df`` degrees of freedom."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(max(q, 0.0) / 2, dtype=torch.float64)))


def _groups_p(x: torch.Tensor) -> list[float]:
    """p-values that the rows of ``x`` (g groups of m values) share one mean and one mean square.

    Under an i.i.d. draw each row's mean (mean square) has the pooled variance / m, so the sum of
    squared deviations of the g row statistics, scaled by it, is chi-square with g - 1 degrees of
    freedom (the pooled fourth moment makes this hold for any distribution: normal, uniform,
    truncated). Training spreads the rows apart; too little spread is not evidence of training.
    """
    g, m = x.shape
    out = []
    for v in (x, x * x):
        var = float(v.var(unbiased=False))
        if var > 0:
            means = v.mean(1)
            out.append(_chi2_sf(float(((means - means.mean()) ** 2).sum()) * m / var, g - 1))
    return out


def _iid_p(data: torch.Tensor) -> tuple[float, str]:
    """How well a matrix passes as an i.i.d. draw: ``(p, the test that decided)``, Bonferroni over the
    tests that apply (rows alike, columns alike, neighbours uncorrelated)."""
    x = data.reshape(data.shape[0], -1)
    r, c = x.shape
    if r * c > MAX_IID:  # whole rows, every step-th: a sample that keeps rows, columns and neighbours
        x = x[:: -(-r * c // MAX_IID)] if c <= MAX_IID // 16 else x[:: max(1, r // 16), :MAX_IID // 16]
        r, c = x.shape
    x = x.to("cpu", torch.float64)
    tests: dict[str, float] = {}
    if r >= 2 and c >= MIN_GROUP:
        tests["rows"] = min(_groups_p(x), default=1.0)
    if c >= 2 and r >= MIN_GROUP:
        tests["columns"] = min(_groups_p(x.T), default=1.0)
    y = x.reshape(-1) - x.mean()
    den = float((y * y).sum())
    if y.numel() >= 2 * MIN_GROUP and den > 0:  # lag-1 autocorrelation in memory order ~ N(0, 1/n)
        z = float((y[1:] * y[:-1]).sum()) / den * math.sqrt(y.numel() - 1)
        tests["neighbours"] = math.erfc(abs(z) / math.sqrt(2))
    if not tests:
        return 1.0, ""
    which = min(tests, key=tests.__getitem__)
    return min(1.0, len(tests) * tests[which]), which


# ------------------------------------------------------------------------------------ the model

def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORM_TYPES):
        return True
    name = type(module).__name__.lower()
    return "norm" in name and not any(True for _ in module.children())


def _fan_in(w: torch.Tensor) -> int:
    return int(w.shape[1] * (w[0][0].numel() if w.dim() > 2 else 1)) if w.dim() >= 2 else 0


def _default_bound(module: nn.Module, leaf: str) -> tuple[float, str] | None:
    """PyTorch's ``reset_parameters`` bound for this tensor, with its name."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and leaf in ("weight", "bias"):
        w = module.weight
        fan = _fan_in(w) if isinstance(w, torch.Tensor) and not w.is_meta else 0
        if fan > 0:
            return 1 / math.sqrt(fan), f"{type(module).__name__} default U(±1/√fan_in), fan_in={fan}"
    if isinstance(module, nn.Bilinear) and leaf in ("weight", "bias"):
        return 1 / math.sqrt(module.weight.shape[1]), "Bilinear default U(±1/√in1_features)"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)) and (leaf.startswith("weight_") or leaf.startswith("bias_")):
        return 1 / math.sqrt(module.hidden_size), f"{type(module).__name__} default U(±1/√hidden_size)"
    if isinstance(module, nn.MultiheadAttention) and leaf in ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                                              "v_proj_weight"):
        w = getattr(module, leaf)
        return math.sqrt(6 / (w.shape[0] + w.shape[1])), "MultiheadAttention default xavier_uniform"
    return None


def _weight_norm_at_init(holder: nn.Module, leaf: str, t: torch.Tensor) -> bool:
    """``weight_g`` (or a weight_norm parametrization's ``original0``) equal to the norm of its direction."""
    if leaf == "weight_g":
        v = getattr(holder, "weight_v", None)
    elif leaf == "original0" and type(holder).__name__ == "ParametrizationList":
        if not any(type(p).__name__ == "_WeightNorm" for p in holder):
            return False
        v = getattr(holder, "original1", None)
    else:
        return False
    if not isinstance(v, torch.Tensor) or v.dim() != t.dim() or v.is_meta:
        return False
    dims = [d for d in range(v.dim()) if t.shape[d] == 1]
    expected = v.detach().float().norm(dim=dims, keepdim=True) if dims else v.detach().float().abs()
    return expected.shape == t.shape and bool(torch.allclose(t.detach().float(), expected, rtol=1e-5, atol=0))


def _tensors(model: nn.Module) -> Iterable[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """``(name, module, leaf, tensor, is_norm)`` for each parameter once (tied ones under their first
    name), and each floating buffer of a norm layer (running statistics, frozen norms)."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        norm = _is_norm(module)
        items = list(module._parameters.items())
        if norm:
            items += [(k, v) for k, v in module._buffers.items() if k in _NORM_LEAVES]
        for leaf, t in items:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            yield (f"{mod_name}.{leaf}" if mod_name else leaf), module, leaf, t, norm


_TF_TRUNC = 0.87962566103423978  # std of N(0, 1) cut at ±2: tf/timm "variance scaling" divides by it
_COMMON_STDS = (1.0, 0.02, 0.01, 0.002, 0.001, 1e-6)


def _scales(shape: tuple[int, ...], vector: bool, config_stds: tuple[float, ...]) -> list[tuple[str, str, float]]:
    """``(family, formula, parameter)`` of the random inits libraries use for a tensor of this shape:
    a normal's std, a uniform's bound, or the std of a normal cut at ±2 std."""
    common = _COMMON_STDS[1:] if vector else _COMMON_STDS  # N(0, 1) vectors: only an Embedding's rows (above)
    stds = [(f"{v:g}", v) for v in common] + [(f"config {v:g}", v) for v in config_stds]
    out = [("normal", f, v) for f, v in stds]
    out += [("truncated", f, v) for f, v in stds if v <= 0.02]
    if vector or len(shape) < 2:
        return out
    rf = math.prod(shape[2:])
    fi, fo = shape[1] * rf, shape[0] * rf
    fans = [("fan_in", fi), ("fan_out", fo), ("fan_avg", (fi + fo) / 2)]
    for name, fan in fans:
        for gain2, g in ((1, ""), (2, "2")):
            sd = math.sqrt(gain2 / fan)
            out.append(("normal", f"√({g or 1}/{name})", sd))
            out.append(("truncated", f"√({g or 1}/{name})", sd / _TF_TRUNC))
        for k in (1, 3, 6):
            out.append(("uniform", f"√({k}/{name})", math.sqrt(k / fan)))
    return out


def _known_p(s: _Sample, family: str, v: float) -> float:
    if family == "uniform":
        return _uniform_p(s, v)
    if family == "normal":
        return _normal_p(s, v)
    if s.amax > 2 * v * (1 + _slack(s.dtype)):  # N(0, v) cut at ±2v
        return 0.0
    z = 2 * _phi(2.0) - 1
    p = ks_pvalue(_ks(s.x, ((_phi(s.x / v) - _phi(-2.0)) / z).clamp(0, 1)), s.x.numel())
    return _shape_p(s, "truncated", v * _TF_TRUNC, p)


_FAMILY_KIND = {"normal": "random normal N(0, σ)", "uniform": "random uniform U(±b)",
                "truncated": "random truncated normal"}


def _check(module: nn.Module, leaf: str, t: torch.Tensor, norm: bool,
           config_stds: tuple[float, ...] = ()) -> tuple[str, str, float, str] | str | None:
    """``(kind, evidence, p, confidence)`` when ``t`` looks like a fresh init, ``"undecided"``, or None."""
    data = t.detach()
    if isinstance(module, nn.Embedding) and module.padding_idx is not None and data.dim() == 2 \
            and not bool(data[module.padding_idx].any()):
        data = torch.cat([data[:module.padding_idx], data[module.padding_idx + 1:]])  # the zeroed padding row
    n = data.numel()
    if n == 0:
        return None
    lo, hi = data.min(), data.max()
    if bool(lo == hi) and n >= 2:
        c = float(lo)
        return f"exactly {c:g}", f"all {n} values exactly {c:g}", 1.0, "certain"
    if _weight_norm_at_init(module, leaf, t):
        return "weight norm at init", f"equals the norm of its direction tensor ({n} values)", 1.0, "certain"
    if norm and leaf in _NORM_LEAVES or not bool(torch.isfinite(data).all()):
        return None  # norm layers start exactly constant; anything else here was changed
    if n < MIN_VALUES:
        return "undecided"
    iid_p, iid_test = _iid_p(data) if sum(d > 1 for d in data.shape) >= 2 else (1.0, "")
    if iid_p < ALPHA_IID:
        return None  # rows, columns or neighbours too unalike for an i.i.d. draw: trained
    found = _fits(module, leaf, t, data, config_stds)
    if found is None or isinstance(found, str):
        return found
    kind, evidence, p, conf = found
    if iid_test:
        evidence += f"; i.i.d. (rows, columns, neighbours): p={iid_p:.2g}"
    return kind, evidence, min(p, iid_p), conf


def _fits(module: nn.Module, leaf: str, t: torch.Tensor, data: torch.Tensor,
          config_stds: tuple[float, ...]) -> tuple[str, str, float, str] | str | None:
    """The init distribution that ``data`` (``t``'s values) fits best, ``"undecided"``, or None."""
    n = data.numel()
    s = _sample(data)
    conf = "high" if n >= 100 else "moderate"
    bound = _default_bound(module, leaf)
    if bound is not None:
        p = _uniform_p(s, bound[0])
        if p >= ALPHA_EXACT:
            return "PyTorch default init", f"{bound[1]} = {bound[0]:.3g}: p={p:.2g}, max |x| {s.amax:.3g}", p, conf
    if isinstance(module, nn.Embedding) and leaf == "weight":
        p = _normal_p(s, 1.0)
        if p >= ALPHA_EXACT:
            return "PyTorch default init", f"Embedding default N(0, 1): p={p:.2g}", p, conf
    if n < MIN_RANDOM:
        return "undecided"
    is_bias = leaf == "bias" or leaf.endswith("_bias")
    vector = is_bias or sum(d > 1 for d in t.shape) <= 1
    if is_bias:  # biases start at zero, at PyTorch's bound (above) or as a tiny normal (timm, torchvision ViT)
        scales = [("normal", "1e-06", 1e-6)]
    else:
        scales = _scales(tuple(t.shape), vector, config_stds)
    sd = math.sqrt(s.m2)
    best: tuple[float, str, str, float] | None = None
    for family, formula, v in scales:
        spread = v / math.sqrt(3) if family == "uniform" else v * (_TF_TRUNC if family == "truncated" else 1)
        tol = 6 * math.sqrt((_KURTOSIS[family][0] + 2) / (4 * s.x.numel())) + 0.01
        if abs(sd / spread - 1) > tol:  # the spread alone rules it out (6 standard errors away)
            continue
        p = _known_p(s, family, v)
        if p >= ALPHA_EXACT and (best is None or p > best[0]):
            best = (p, family, formula, v)
    if best is not None:
        p, family, formula, v = best
        what = {"normal": f"N(0, {formula} = {v:.3g})", "uniform": f"U(±{formula} = {v:.3g})",
                "truncated": f"N(0, {formula} = {v:.3g}) cut at ±2σ"}[family]
        return _FAMILY_KIND[family], f"{what}: p={p:.2g}", p, conf
    if n >= MIN_FITTED and not vector:
        fit = _fitted(s)
        if fit is not None and fit[0] >= ALPHA_FITTED:
            return fit[1], fit[2], fit[0], "high"
    return None


def _config_stds(model: nn.Module) -> tuple[float, ...]:
    """Init stds a Hugging Face style config declares (``initializer_range``, ``init_std``, width ** -0.5)."""
    out: list[float] = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        for attr in ("initializer_range", "init_std", "std_init"):
            v = getattr(cfg, attr, None)
            if isinstance(v, float) and 0 < v < 10 and v not in out and v not in _COMMON_STDS:
                out.append(v)
        for attr in ("d_model", "hidden_size", "n_embd"):  # T5-style init: std = width ** -0.5
            d = getattr(cfg, attr, None)
            if isinstance(d, int) and d > 0 and d ** -0.5 not in out:
                out.append(d ** -0.5)
        if len(out) > 6:
            break
    return tuple(out)


def find_untrained(model: nn.Module) -> UntrainedReport:
    """The tensors of ``model`` whose values look like a fresh default initialisation.

    Works on any model, however it was loaded: it reads only the values. Parameters are tested
    (tied ones once), and the running statistics of norm layers; integer and meta tensors are
    skipped.

    Args:
        model: the model to examine.

    Returns:
        An :class:`UntrainedReport`: the flagged tensors with their evidence, grouped by
        distribution when printed, and what was checked.

    Example:
        >>> import torch
        >>> report = find_untrained(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)))
        >>> sorted(report.groups())
        ['PyTorch default init', 'exactly 0', 'exactly 1']
    """
    flagged: list[InitFinding] = []
    checked: list[str] = []
    undecided: list[str] = []
    config_stds = _config_stds(model)
    with torch.no_grad():
        for name, module, leaf, t, norm in _tensors(model):
            if t.is_meta or not (t.is_floating_point()) or t.is_sparse or t.layout != torch.strided:
                continue
            checked.append(name)
            result = _check(module, leaf, t, norm, config_stds)
            if result == "undecided":
                undecided.append(name)
            elif result is not None:
                kind, evidence, p, conf = result
                flagged.append(InitFinding(name, type(module).__name__, kind, evidence, p, t.numel(), conf))
    return UntrainedReport(tuple(flagged), tuple(checked), tuple(undecided))
