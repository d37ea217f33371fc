"""Merge methods: parity with mergekit (stored fixtures, no mergekit needed) and 4x4 checks by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge import methods as M
from evomerge.errors import ConfigError, PoolError
from evomerge.methods import METHODS, get_method, lowrank_lora_merge, topmag
from evomerge.methods.sparsify import _magnitude_kept, _sparsify_kept

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit"
META = json.loads((FIXTURES / "cases.json").read_text())
TENSORS = load_file(str(FIXTURES / "cases.safetensors"))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sparsify(kind, t, density, params, generator):
    """What the task-arithmetic family's sparsifier `kind` keeps of t, as the merge builds it."""
    return _sparsify_kept(kind, t, density, params, generator).tensor(t)


# ------------------------------------------------------------------------------------------------
# Parity with mergekit


def _inputs(case):
    cid = case["id"]
    base = TENSORS[f"{cid}/base"]
    experts = [TENSORS[f"{cid}/expert{i}"] for i in range(len(case["weights"]))]
    return base, [x - base for x in experts]


def _replayed_masks(case, deltas):
    """The masks mergekit's rule draws for this case (the reference's, below: same order, same calls)."""
    g, eps = gen(case["seed"]), case["params"].get("epsilon", 0.15)
    masks = []
    for d, rho in zip(deltas, case["densities"]):
        if rho >= 1:
            masks.append(None)
        elif case["method"].startswith("della"):
            masks.append(torch.bernoulli(ref_della_probs(d, rho, eps), generator=g).reshape(d.shape))
        else:
            masks.append(ref_dare_mask(d, rho, g))
    return masks


@pytest.mark.parametrize("case", META["cases"], ids=lambda c: c["id"])
def test_mergekit_parity(case):
    base, deltas = _inputs(case)
    if case["random"]:
        for i, mask in enumerate(_replayed_masks(case, deltas)):
            if mask is not None and not torch.equal(mask, TENSORS[f"{case['id']}/mask{i}"]):
                if torch.__version__ != META["torch"]:
                    pytest.skip(f"torch {torch.__version__} draws other masks than torch {META['torch']}")
                pytest.fail(f"expert {i}: evomerge's mask differs from mergekit's with the same seed")
    method = get_method(case["method"])
    out = method.merge(base, deltas, case["weights"], case["densities"], case["params"], gen(case["seed"] or 0))
    expected = TENSORS[f"{case['id']}/out"]
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-5


# Methods added after the fixtures were made (mergekit 0.1.5 is not installed here): each is checked
# against the formula of mergekit's code and its paper instead (test_model_stock_* below).
FORMULA_CHECKED = {"model_stock"}


def test_fixtures_cover_every_mergekit_method():
    covered = {case["method"] for case in META["cases"]} | FORMULA_CHECKED
    assert covered == {get_method(n).mergekit_name for n in METHODS.names()} - {None}


# ------------------------------------------------------------------------------------------------
# Statistics of the random methods (hold on any torch version)


def test_dare_keeps_density_and_l1_rescales():
    delta = torch.randn(200, 200, generator=gen(1))
    kept = sparsify("random", delta, 0.3, {"rescale": True}, gen(2))
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.01
    assert kept.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    unbiased = sparsify("random", delta, 0.3, {"rescale": True, "rescale_unbiased": True}, gen(2))
    assert torch.allclose(unbiased, delta * (kept != 0) / 0.3)


def test_della_keeps_density_and_prefers_large_entries():
    delta = torch.randn(100, 400, generator=gen(3))
    kept = sparsify("della", delta, 0.5, {"rescale": False, "epsilon": 0.2}, gen(4))
    assert abs((kept != 0).float().mean().item() - 0.5) < 0.01
    big = delta.abs() > delta.abs().median(dim=1, keepdim=True).values
    assert (kept[big] != 0).float().mean() > 0.57 > 0.43 > (kept[~big] != 0).float().mean()


# ------------------------------------------------------------------------------------------------
# Hand-checkable 4x4 cases

T = torch.tensor(
    [[1.0, -2.0, 3.0, -4.0], [5.0, -6.0, 7.0, -8.0], [0.5, 0.25, -0.75, 9.0], [-10.0, 0.1, 0.2, 0.3]]
)


def test_topmag_keeps_exactly_k():
    kept = topmag(T, 0.25)  # round(0.25 * 16) = 4: |-10|, 9, -8, 7
    assert (kept != 0).sum() == 4
    assert set(kept[kept != 0].tolist()) == {-10.0, 9.0, -8.0, 7.0}
    assert torch.equal(topmag(T, 1.0), T) and torch.equal(topmag(T, 0.0), torch.zeros(4, 4))
    assert (topmag(torch.zeros(4, 4), 0.5) != 0).sum() == 0  # ties at 0: k kept, all zero
    assert (topmag(T, 0.5 / 16) != 0).sum() == 1  # round half up
    assert (topmag(torch.tensor([1.0, -3.0, 2.0]), 0.01) == torch.tensor([0.0, -3.0, 0.0])).all()  # tiny: >= 1


def test_topmag_with_ties_keeps_exactly_k():
    assert (topmag(torch.ones(4, 4), 0.5) != 0).sum() == 8
    assert (topmag(torch.ones(4, 4), 0.75) != 0).sum() == 12  # k > n/2: drops the n-k smallest


def test_topmag_dense_keeps_all_but_smallest():
    kept = topmag(T, 0.75)  # 12 kept: the 4 smallest |entries| 0.1, 0.2, 0.25, 0.3 dropped
    assert sorted(T[kept == 0].tolist()) == pytest.approx([0.1, 0.2, 0.25, 0.3])


def test_ties_sign_election_by_mass():
    base = torch.zeros(4, 4)
    d1 = torch.full((4, 4), 1.0)
    d2 = torch.full((4, 4), -3.0)
    d2[0, 0] = 0.5  # first entry: both positive, mean of the two
    out = get_method("ties").merge(base, [d1, d2], [1.0, 1.0], [1.0, 1.0])
    assert out[0, 0] == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert out[1, 1] == pytest.approx(-3.0)  # mass -2: only expert 2 agrees, divided by its weight


def test_ties_negative_weights_normalize_abs():
    base, d = torch.zeros(4, 4), torch.ones(4, 4)
    ties = get_method("ties")
    # mergekit: weighted deltas 1.0 and -0.5 -> sign +, only expert 1 kept, divided by 1.0
    assert ties.merge(base, [d, d], [1.0, -0.5], [1.0, 1.0])[0, 0] == pytest.approx(1.0)
    # signed divisor over kept experts can cancel: weights 2 and -1 both kept where deltas differ in sign
    signed = ties.merge(base, [d, -d], [2.0, -1.0], [1.0, 1.0])  # D = 2, +1: divisor 2 - 1 = 1
    assert signed[0, 0] == pytest.approx(3.0)
    safe = ties.merge(base, [d, -d], [2.0, -1.0], [1.0, 1.0], {"normalize_abs": True})
    assert safe[0, 0] == pytest.approx(1.0)  # 3 / (|2| + |-1|)


def test_dare_seeded_determinism():
    base, deltas = torch.zeros(4, 4), [T, -T]
    dare = get_method("dare_ties")
    a = dare.merge(base, deltas, [1.0, 0.5], [0.5, 0.5], generator=gen(7))
    b = dare.merge(base, deltas, [1.0, 0.5], [0.5, 0.5], generator=gen(7))
    c = dare.merge(base, deltas, [1.0, 0.5], [0.5, 0.5], generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_methods_never_touch_global_rng():
    state = torch.get_rng_state()
    for name in ("dare_linear", "dare_ties", "della", "della_linear"):
        get_method(name).merge(torch.zeros(4, 4), [T], [1.0], [0.5], generator=gen(1))
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="Generator"):
        get_method("dare_ties").merge(torch.zeros(4, 4), [T], [1.0], [0.5])


def test_breadcrumbs_gamma_zero_does_not_zero():
    out = get_method("breadcrumbs").merge(torch.zeros(4, 4), [T], [1.0], [0.25], {"gamma": 0.0})
    assert torch.equal(out, topmag(T, 0.25))
    # gamma 1/8: the 2 largest (-10, 9) dropped, the next 4 (-8, 7, -6, 5) kept
    out = get_method("breadcrumbs").merge(torch.zeros(4, 4), [T], [1.0], [0.25], {"gamma": 0.125})
    assert set(out[out != 0].tolist()) == {-8.0, 7.0, -6.0, 5.0}


def test_lowrank_lora_merge_keeps_cross_terms():
    A1, A2 = torch.eye(2, 4), torch.eye(2, 4) * 2  # (r=2, in=4)
    B1, B2 = torch.ones(4, 2), -torch.ones(4, 2)  # (out=4, r=2)
    A, B = lowrank_lora_merge([A1, A2], [B1, B2], [0.5, 0.25], [1.0, 1.0])
    assert torch.equal(A, 0.5 * A1 + 0.25 * A2) and torch.equal(B, 0.5 * B1 + 0.25 * B2)
    # the dense merge (sum of the experts' own updates) cancels here; B @ A keeps the cross terms
    dense = 0.5 * B1 @ A1 + 0.25 * B2 @ A2
    assert torch.allclose(dense, torch.zeros(4, 4)) and not torch.allclose(B @ A, torch.zeros(4, 4))
    pairs = [(0.5, B1, A1), (0.25, B2, A2)]
    assert torch.allclose(B @ A, sum(wi * wj * Bi @ Aj for wi, Bi, _ in pairs for wj, _, Aj in pairs))
    A, _ = lowrank_lora_merge([T[:2]], [torch.ones(4, 2)], [1.0], [0.25])  # only A is sparsified
    assert (A != 0).sum() == 2
    with pytest.raises(PoolError):
        lowrank_lora_merge([A1], [torch.ones(3, 3)], [1.0], [1.0])
    with pytest.raises(ConfigError, match=r"density\[0\]=1.5"):
        lowrank_lora_merge([A1], [B1], [1.0], [1.5])


def test_consensus_k_rule():
    base = torch.zeros(4, 4)
    d1, d2, d3 = torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4)
    d1[0, 0] = d2[0, 0] = d3[0, 0] = 1.0  # all agree: each |1| > 0.4 * |3 - 1| -> 3 masks
    d1[0, 1] = 1.0  # only expert 1: its mask (|1| > 0) alone -> "selfish", dropped at k=2
    d1[0, 2], d2[0, 2], d3[0, 2] = 5.0, 0.1, 0.1  # experts 2, 3: 0.1 > 0.4 * 5.1? no -> 1 mask
    consensus = get_method("consensus")
    out = consensus.merge(base, [d1, d2, d3], [1.0, 1.0, 1.0], None)
    assert out[0, 0] == 3.0 and out[0, 1] == 0.0 and out[0, 2] == 0.0
    out = consensus.merge(base, [d1, d2, d3], [1.0, 1.0, 1.0], None, {"k": 1})
    assert out[0, 1] == 1.0 and out[0, 2] == pytest.approx(5.2)


def test_slerp_endpoints():
    base, delta = T, torch.randn(4, 4, generator=gen(5))
    slerp = get_method("slerp")
    assert torch.allclose(slerp.merge(base, [delta], None, None, {"t": 0.0}), base, atol=1e-6)
    assert torch.allclose(slerp.merge(base, [delta], None, None, {"t": 1.0}), base + delta, atol=1e-6)
    with pytest.raises(ConfigError, match="1 expert"):
        slerp.merge(base, [delta, delta], None, None, {"t": 0.5})


def test_evo_merging_is_weighted_topmag_sum():
    out = get_method("evo_merging").merge(torch.ones(4, 4), [T, T], [1.0, -0.5], [0.25, 1.0])
    assert torch.equal(out, 1 + topmag(T, 0.25) - 0.5 * T)


def test_linear_and_task_arithmetic_by_hand():
    base, d = torch.ones(4, 4), torch.ones(4, 4)
    assert get_method("linear").merge(base, [d, -d], [3.0, 1.0], None)[0, 0] == pytest.approx(1.5)  # (3*2 + 0)/4
    ta = get_method("task_arithmetic").merge(base, [d, 2 * d], [0.5, 0.5], None, {"lambda": 2.0})
    assert ta[0, 0] == pytest.approx(4.0)  # 1 + 2 * (0.5 + 1)


def test_bf16_inputs_are_upcast():
    out = get_method("task_arithmetic").merge(T.bfloat16(), [T.bfloat16()], [1.0], None)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "name, densities, params, match",
    [
        ("ties", [1.5], {}, r"density\[0\]=1.5 is outside \[0.0, 1.0\]"),
        ("ties", [0.5], {"desnity": 0.5}, "did you mean 'density'"),
        ("ties", [0.5], {"density": 0.5}, "per expert"),
        ("ties", [0.5], {"normalize": 1}, "true or false"),
        ("breadcrumbs", [0.5], {"gamma": -0.1}, "gamma=-0.1 is outside"),
        ("della", [0.1], {"epsilon": 0.15}, "density \\+- epsilon"),
        ("slerp", [1.0], {"t": 1.5}, "t=1.5 is outside"),
        ("consensus", [1.0], {"lambda": float("nan")}, "must be finite"),
        ("linear", [1.0, 1.0], {}, "sum to 0"),
    ],
)
def test_domain_errors(name, densities, params, match):
    weights = [1.0, -1.0] if name == "linear" else [1.0]
    deltas = [T] * len(densities)
    with pytest.raises(ConfigError, match=match):
        get_method(name).merge(torch.zeros(4, 4), deltas, weights, densities, params, gen())


def test_registry_and_declarations():
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        get_method("tie")
    with pytest.raises(ConfigError, match="2 weights for 1 experts"):
        get_method("ties").merge(T, [T], [1.0, 1.0], [1.0])
    with pytest.raises(PoolError):
        get_method("ties").merge(T, [T[:2]], [1.0], [1.0])
    for name in METHODS.names():
        method = get_method(name)
        names = [p.name for p in method.parameters]
        assert len(names) == len(set(names)), name
        assert method.random == (name.startswith(("dare", "della")))


def test_every_method_runs_on_a_one_element_tensor():
    one = torch.zeros(1)
    for name in METHODS.names():
        if get_method(name).acts_on == "outputs":  # a fusion rule: it refuses tensors, in one line
            with pytest.raises(ConfigError, match="merges no tensors"):
                get_method(name).merge(one, [one + 1], [0.5], [0.5], None, gen())
            continue
        n = 1 if name == "slerp" else 2
        out = get_method(name).merge(one, [one + 1] * n, [0.5] * n, [0.5] * n, None, gen())
        assert out.shape == (1,) and torch.isfinite(out).all(), name


def test_evomerge_only_flags_are_declared_and_off_by_default():
    for name in METHODS.names():
        for p in get_method(name).parameters:
            if p.name in M.EVOMERGE_ONLY_PARAMS:
                assert p.default is False
    assert get_method("ties").param("normalize_abs") is not None
    assert get_method("dare_ties").param("rescale_unbiased") is not None


# ------------------------------------------------------------------------------------------------
# The streamed TIES family against a stacked reference (bit for bit, up to 4 experts)
#
# The reference shares no code with evomerge.methods: each sparsifier is written from its definition
# (mergekit's code, the papers) and the family's structure from this table. Where a definition leaves
# a choice to torch (which of equal magnitudes at the cut is kept, the Bernoulli stream), the reference
# makes the call the methods' docs name: torch.topk's choice (for k > n/2, dropping the n-k smallest),
# torch's ascending sort for breadcrumbs, one torch.bernoulli draw per expert in expert order.

REF_FAMILY = {  # method: (sparsifier, TIES sign election)
    "task_arithmetic": (None, False), "ties": ("magnitude", True),
    "dare_linear": ("random", False), "dare_ties": ("random", True),
    "breadcrumbs": ("outliers", False), "breadcrumbs_ties": ("outliers", True),
    "della": ("della", True), "della_linear": ("della", False),
}


def ref_dare_mask(t, density, generator):
    """DARE/mergekit: keep each entry with probability density (float 0/1)."""
    return torch.bernoulli(torch.full_like(t, density, dtype=torch.float32), generator=generator)


def ref_della_probs(t, density, epsilon):
    """DELLA: p = density - eps + 2 eps * (rank - 1)/(n - 1), ranks 1..n of |t| along each row (dim 1;
    a 1-D tensor is one row); a row of one entry gets p = density."""
    rows = t.reshape(1, -1) if t.dim() < 2 else t
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1)
    counting = torch.arange(1.0, n + 1).reshape(1, n, *([1] * (rows.dim() - 2))).expand_as(rows).contiguous()
    ranks = torch.empty_like(rows).scatter_(1, order, counting)
    rank_norm = (ranks - 1) / (n - 1) if n > 1 else torch.full_like(rows, 0.5)
    return (density - epsilon) + rank_norm * 2 * epsilon


def ref_keep_largest(t, k):
    flat = t.abs().reshape(-1)
    n = flat.numel()
    if 2 * k <= n:
        mask = torch.zeros(n)
        mask[torch.topk(flat, k, sorted=False).indices] = 1.0
    else:
        mask = torch.ones(n)
        mask[torch.topk(flat, n - k, largest=False, sorted=False).indices] = 0.0
    return mask.reshape(t.shape)


def ref_l1_rescaled(t, kept):
    """mergekit's rescale: the kept part scaled to the L1 norm of t (unless either is ~0)."""
    before, after = t.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def ref_sparsify(kind, t, density, params, generator):
    n = t.numel()
    if kind is None or density >= 1:
        return t
    if kind == "magnitude":  # TIES trim: the max(1, int(density * n)) largest |entries|
        kept = torch.zeros_like(t) if density <= 0 else ref_keep_largest(t, max(1, int(density * n))) * t
    elif kind == "outliers":  # breadcrumbs: int(density * n) kept above the int(gamma * n) largest
        keep = int(density * n)
        bottom = max(0, n - keep - int(params["gamma"] * n))
        mask = torch.zeros(n)
        mask[torch.argsort(t.abs().reshape(-1))[bottom:bottom + keep]] = 1.0
        kept = mask.reshape(t.shape) * t
    else:
        if kind == "della" and density <= 0:
            return torch.zeros_like(t)
        if kind == "della":
            probs = ref_della_probs(t, density, params["epsilon"])
            mask = torch.bernoulli(probs, generator=generator).reshape(t.shape)
            probs = probs.reshape(t.shape)
        else:
            mask, probs = ref_dare_mask(t, density, generator), torch.full_like(t, density)
        if params.get("rescale_unbiased"):
            return mask * t / probs
        return ref_l1_rescaled(t, mask * t) if params["rescale"] else mask * t
    return ref_l1_rescaled(t, kept) if params.get("rescale") else kept


def _stacked_reference(method, base, deltas, weights, densities, params, generator):
    """The task-arithmetic family written the direct way: stack, weight, elect, sum, normalize, scale."""
    kind, elect = REF_FAMILY[method.name]
    params = {**{p.name: p.default for p in method.parameters if not p.per_expert}, **params}
    sparse = [ref_sparsify(kind, d, rho, params, generator) for d, rho in zip(deltas, densities)]
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    weighted = torch.stack(sparse) * w
    if elect:  # sign by mass ("sum"); zeros have no sign; divide by the kept experts' weights
        agree = (weighted.sign() == torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)).float()
        mixed = (weighted * agree).sum(dim=0)
        signed, absolute, tol = (w * agree).sum(dim=0), (w.abs() * agree).sum(dim=0), 0.0
    else:
        mixed = weighted.sum(dim=0)
        signed, absolute, tol = w.sum(dim=0), w.abs().sum(dim=0), 1e-8
    if params["normalize_abs"]:
        mixed = mixed / torch.where(absolute == 0, 1.0, absolute)
    elif params["normalize"]:
        mixed = mixed / torch.where(signed.abs() <= tol, 1.0, signed)
    return base + mixed * params["lambda"]


STREAMED_CASES = [
    ("task_arithmetic", {"normalize": True}), ("ties", {}), ("ties", {"normalize_abs": True, "lambda": 0.5}),
    ("ties", {"rescale": True}), ("dare_linear", {}), ("dare_linear", {"rescale": False}), ("dare_ties", {"rescale_unbiased": True}), ("dare_ties", {"normalize": True}),
    ("breadcrumbs", {"gamma": 0.1}), ("breadcrumbs_ties", {"normalize": True}),
    ("della", {"epsilon": 0.1}), ("della_linear", {"epsilon": 0.1, "rescale_unbiased": True}),
]


@pytest.mark.parametrize("name, params", STREAMED_CASES, ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("n_experts", [1, 2, 4])
def test_streamed_merge_equals_stacked_reference_bitwise(name, params, n_experts):
    g = gen(n_experts)
    base = (torch.randn(48, 40, generator=g) * 0.02).bfloat16()
    # bfloat16 experts: task vectors with many equal magnitudes (ties at the trim cut), exact zeros, -0.0
    deltas = [torch.sub((base.float() + torch.randn(48, 40, generator=g) * 0.01).bfloat16(), base.float())
              for _ in range(n_experts)]
    deltas[0][:3] = -0.0
    base = base.float()
    weights = [1.0, -0.4, 0.3, 0.0][:n_experts]
    densities = [0.3, 0.5, 1.0, 0.7][:n_experts]
    method = get_method(name)
    copies = [d.clone() for d in deltas]
    out = method.merge(base, deltas, weights, densities, params, gen(5))
    expected = _stacked_reference(method, base, copies, weights, densities, params, gen(5))
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    assert all(torch.equal(d, c) for d, c in zip(deltas, copies))  # the task vectors are only read


def test_sparsifier_masks_are_bool_and_exact():
    kept = _magnitude_kept(T, 0.5)
    assert kept.keep.dtype == torch.bool and int(kept.keep.sum()) == 8
    assert torch.equal(kept.tensor(T), T * kept.keep)
    assert _magnitude_kept(T, 0.0).zero and _magnitude_kept(T, 1.0).keep is None


# ------------------------------------------------------------------------------------------------
# Model Stock (Jang et al. 2024, arXiv:2403.19522; mergekit's model_stock): written out in float64


def _model_stock_by_hand(base, taus):
    """The paper's w_H = t * w_avg + (1 - t) * w_0 with t = N cos / (1 + (N - 1) cos), cos the mean
    pairwise cosine of the task vectors (mergekit's choice for N > 2)."""
    flat = [t.double().reshape(-1) for t in taus]
    pairs = [(a @ b) / (a.norm() * b.norm()) for i, a in enumerate(flat) for b in flat[i + 1:]]
    cos = sum(pairs) / len(pairs)
    n = len(taus)
    t = n * cos / (1 + (n - 1) * cos)
    average = sum(base.double() + tau.double() for tau in taus) / n
    return (t * average + (1 - t) * base.double()).float()


@pytest.mark.parametrize("n_experts", [2, 3, 4])
def test_model_stock_follows_the_paper_formula(n_experts):
    g = gen(n_experts)
    base = torch.randn(4, 4, generator=g)
    shared = torch.randn(4, 4, generator=g)  # experts that agree in part: cos well inside (0, 1)
    taus = [shared + torch.randn(4, 4, generator=g) for _ in range(n_experts)]
    out = get_method("model_stock").merge(base, taus, None, None)
    torch.testing.assert_close(out, _model_stock_by_hand(base, taus), atol=1e-5, rtol=1e-5)


def test_model_stock_orthogonal_experts_give_the_base_and_equal_ones_the_expert():
    base = torch.ones(2, 2)
    a, b = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert torch.equal(get_method("model_stock").merge(base, [a, b], None, None), base)  # cos 0 -> t 0
    torch.testing.assert_close(get_method("model_stock").merge(base, [a, a], None, None), base + a)  # t 1


def test_model_stock_filter_wise_gives_each_row_its_own_ratio():
    g = gen(9)
    base, taus = torch.randn(3, 5, generator=g), [torch.randn(3, 5, generator=g) for _ in range(2)]
    out = get_method("model_stock").merge(base, taus, None, None, {"filter_wise": True})
    for row in range(3):
        expected = _model_stock_by_hand(base[row], [t[row] for t in taus])
        torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5)
    vector = get_method("model_stock").merge(base[0], [t[0] for t in taus], None, None, {"filter_wise": True})
    torch.testing.assert_close(vector, expected_row0 := _model_stock_by_hand(base[0], [t[0] for t in taus]),
                               atol=1e-5, rtol=1e-5)  # a 1-D tensor is one row
    assert expected_row0.shape == (5,)


def test_model_stock_needs_two_experts():
    with pytest.raises(ConfigError, match="'model_stock' needs >= 2 expert"):
        get_method("model_stock").merge(T, [T], None, None)
