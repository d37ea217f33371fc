"""Regenerate tests/fixtures/mergekit/: mergekit's own outputs on small random tensors.

Run with a Python that has mergekit installed (not evomerge's venv; CI never needs mergekit):

    python3 -m venv /tmp/mkvenv
    /tmp/mkvenv/bin/pip install torch==2.13.0      # CPU build first, pinned
    /tmp/mkvenv/bin/pip install mergekit==0.1.5
    /tmp/mkvenv/bin/python tests/benchmarks/make_mergekit_fixtures.py

Writes cases.safetensors (per case: base, expert{i}, out, and for random methods mask{i}, the keep
masks mergekit drew) and cases.json (method, weights, densities, params, RNG seed, versions).
Random methods run after torch.manual_seed(seed); evomerge replays them with
torch.Generator().manual_seed(seed), which gives the same Bernoulli stream on the same torch version.
"""

from __future__ import annotations

import json
from pathlib import Path

import mergekit
import torch
from mergekit.merge_methods.api import merge_tensors
from mergekit.sparsify import SparsificationMethod, sparsify
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "mergekit"

SHAPES = {"matrix": (16, 24), "vector": (37,), "tiny": (2, 2), "cube": (3, 4, 5)}
EXPERT_SETS = [  # (weights, densities): negative weights included
    ([0.7, -0.4, 1.1], [0.3, 0.6, 0.9]),
    ([0.5, 0.5], [0.5, 0.2]),
    ([1.0, 0.25, -0.6, 0.8], [0.75, 0.4, 0.5, 1.0]),
]
METHOD_PARAMS = {  # method: list of global-parameter variants (mergekit names)
    "task_arithmetic": [{}, {"lambda": 0.3}, {"normalize": True}],
    "ties": [{}, {"normalize": False, "lambda": 0.7}, {"rescale": True}],
    "dare_linear": [{}, {"rescale": False}],
    "dare_ties": [{}, {"normalize": True, "lambda": 0.5}],
    "breadcrumbs": [{}, {"gamma": 0.0}, {"gamma": 0.1, "normalize": True}],
    "breadcrumbs_ties": [{}, {"gamma": 0.05}],
    "della": [{}, {"epsilon": 0.1, "rescale": False}],
    "della_linear": [{}, {"epsilon": 0.05, "lambda": 0.8}],
    "linear": [{}, {"normalize": False}],
}
RANDOM = {"dare_linear": "random", "dare_ties": "random", "della": "della_magprune", "della_linear": "della_magprune"}
PER_EXPERT_IN_MERGEKIT = ("gamma", "epsilon")  # evomerge takes these as one global value


def della_ok(densities, params) -> bool:
    eps = params.get("epsilon", 0.15)
    return all(d >= 1 or (d - eps > 0 and d + eps < 1) for d in densities)


def mergekit_params(method, weights, densities, params):
    out = {k: v for k, v in params.items() if k not in PER_EXPERT_IN_MERGEKIT}
    out["weight"] = list(weights)
    if method != "linear":
        out["density"] = list(densities)
    for key in PER_EXPERT_IN_MERGEKIT:
        if key in params:
            out[key] = [params[key]] * len(weights)
    return out


def masks_drawn(method, base, experts, densities, params, seed):
    """The keep masks mergekit's own sparsify draws in the merge (same seed, same call order)."""
    torch.manual_seed(seed)
    masks = []
    for x, d in zip(experts, densities):
        delta = x - base
        kept = sparsify(
            delta, density=d, method=SparsificationMethod(RANDOM[method]), epsilon=params.get("epsilon", 0.15)
        )
        masks.append((kept != 0).float())
    return masks


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    cases = []
    gen = torch.Generator().manual_seed(1234)
    for method, variants in METHOD_PARAMS.items():
        for vi, params in enumerate(variants):
            for si, (weights, densities) in enumerate(EXPERT_SETS):
                for shape_name, shape in SHAPES.items():
                    if method.startswith("della") and not della_ok(densities, params):
                        continue
                    cid = f"{method}-{vi}-{si}-{shape_name}"
                    base = torch.randn(shape, generator=gen)
                    experts = [base + torch.randn(shape, generator=gen) * 0.1 for _ in weights]
                    seed = len(cases) + 17
                    torch.manual_seed(seed)
                    inputs = experts if method == "linear" else [base, *experts]  # linear: experts only
                    out = merge_tensors(
                        inputs,
                        method,
                        parameters=mergekit_params(method, weights, densities, params),
                        base_index=None if method == "linear" else 0,
                    )
                    tensors[f"{cid}/base"] = base
                    tensors[f"{cid}/out"] = out.float().contiguous()
                    for i, x in enumerate(experts):
                        tensors[f"{cid}/expert{i}"] = x
                    if method in RANDOM:
                        for i, m in enumerate(masks_drawn(method, base, experts, densities, params, seed)):
                            tensors[f"{cid}/mask{i}"] = m
                    cases.append(
                        {"id": cid, "method": method, "weights": weights, "densities": densities,
                         "params": params, "seed": seed, "random": method in RANDOM}
                    )
    add_slerp_cases(tensors, cases, gen)
    save_file(tensors, str(OUT / "cases.safetensors"))
    meta = {"mergekit": mergekit.__version__ if hasattr(mergekit, "__version__") else version(),
            "torch": torch.__version__, "cases": cases}
    lines = ",\n".join("  " + json.dumps(case) for case in meta.pop("cases"))
    head = json.dumps(meta)[:-1]
    (OUT / "cases.json").write_text(f'{head}, "cases": [\n{lines}\n]}}\n')
    print(f"{len(cases)} cases -> {OUT}")


def add_slerp_cases(tensors, cases, gen) -> None:
    for shape_name, shape in SHAPES.items():
        for t in (0.0, 0.3, 0.5, 1.0):
            for kind in ("random", "colinear"):
                cid = f"slerp-{kind}-{t}-{shape_name}"
                base = torch.randn(shape, generator=gen)
                expert = base * 2 if kind == "colinear" else torch.randn(shape, generator=gen)
                out = merge_tensors([base, expert], "slerp", parameters={"t": t}, base_index=0)
                tensors[f"{cid}/base"] = base
                tensors[f"{cid}/expert0"] = expert
                tensors[f"{cid}/out"] = out.float().contiguous()
                cases.append({"id": cid, "method": "slerp", "weights": [1.0], "densities": [1.0],
                              "params": {"t": t}, "seed": None, "random": False})


def version() -> str:
    from importlib.metadata import version as v

    return v("mergekit")


if __name__ == "__main__":
    main()
