"""SearchSpace: genes derived from the merge methods, genome <-> Recipe, presets, stages, penalty."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.methods import get_method
from evomerge.optimizers import optimizer_from_config
from evomerge.recipe import ExpertOverride, Override, Recipe
from evomerge.searchspace import load_space, presets

EXPERTS = ["add", "mul", "rev"]


def rng_genome(space, seed=0):
    return np.random.default_rng(seed).uniform(space.lower, space.upper)


@pytest.mark.parametrize("preset", ["evo-merging", "lorahub", "ties-dare", "layerwise", "no-sign-flip"])
def test_presets_load_and_make_valid_recipes(preset):
    space = load_space(preset, experts=EXPERTS, n_layers=4)
    for i in range(space.n_stages):
        stage = space.stage(i)
        for x in (stage.x0, stage.lower, stage.upper, rng_genome(stage, i)):
            recipe = stage.to_recipe(x)
            assert Recipe.from_yaml(recipe.to_yaml()) == recipe
            method = get_method(recipe.method)
            for plan in (recipe.plan("model.layers.2.mlp.up_proj.weight"), recipe.plan("model.embed_tokens.weight")):
                method._per_expert("weight", plan.weights, len(EXPERTS))  # inside the method's domain
                method._per_expert("density", plan.densities, len(EXPERTS))
                method._globals(plan.parameters)
        hints = {**stage.optimizer_hints, **({"budget": 50} if "nevergrad" in stage.optimizer_hints.values() else {})}
        opt = optimizer_from_config(hints, dim=stage.dim, lower=stage.lower, upper=stage.upper,
                                    x0=stage.x0, seed=0)
        for c in opt.ask(2):
            assert np.all(c.x >= stage.lower) and np.all(c.x <= stage.upper)
            stage.to_recipe(c.x)


def test_presets_listed_and_unknown_preset():
    assert {"evo-merging", "lorahub", "ties-dare", "layerwise", "no-sign-flip"} <= set(presets())
    with pytest.raises(ConfigError, match="did you mean 'evo-merging'.*presets: .*evo-merging"):
        load_space("evo-mergin", experts=EXPERTS)


def test_evo_merging_genes_and_names():
    space = load_space("evo-merging", experts=EXPERTS)
    assert space.names() == [f"density[{e}]" for e in EXPERTS] + [f"weight[{e}]" for e in EXPERTS]
    np.testing.assert_allclose(space.x0, [1, 1, 1, 1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(space.lower, [0, 0, 0, -1.5, -1.5, -1.5])
    assert space.n_stages == 2 and space.optimizer_hints == {"type": "cmaes", "sigma0": 0.05, "popsize": 20}
    nsf = load_space("no-sign-flip", experts=EXPERTS)
    assert nsf.stage(1).lower.tolist() == [0.0, 0.0, 0.0]


def test_round_trip_genome_recipe_genome():
    space = load_space("ties-dare", experts=EXPERTS, n_layers=8, layer_groups=2, modules=["attention", "mlp"])
    assert space.dim == 2 * 3 * 2 * 2
    assert "weight[add]@layers0-3/attn" in space.names() and "density[rev]@layers4-7/mlp" in space.names()
    x = rng_genome(space)
    recipe = space.to_recipe(x)
    np.testing.assert_array_equal(space.to_vector(recipe), x)
    np.testing.assert_array_equal(space.to_vector(Recipe.from_yaml(recipe.to_yaml())), x)
    # the recipe applies each cell's genes to that cell's tensors
    i = space.names().index("weight[mul]@layers4-7/attn")
    assert recipe.plan("model.layers.5.self_attn.q_proj.weight").weights[1] == x[i]
    j = space.names().index("density[add]@layers0-3/mlp")
    assert recipe.plan("model.layers.3.mlp.down_proj.weight").densities[0] == x[j]
    # outside every cell: the mean of the expert's cell genes
    mul_weights = [x[k] for k, n in enumerate(space.names()) if n.startswith("weight[mul]")]
    assert recipe.plan("model.embed_tokens.weight").weights[1] == pytest.approx(np.mean(mul_weights))


def test_recipe_without_overrides_maps_onto_a_layered_space():
    space = load_space("layerwise", experts=EXPERTS, n_layers=4)
    recipe = Recipe(method="task_arithmetic", experts={"add": {"weight": 0.5}, "mul": {"weight": -0.2}, "rev": {}},
                    overrides=[Override(layers=(2, 4), experts={"rev": ExpertOverride(weight=0.7)})])
    x = space.to_vector(recipe)
    assert x.tolist() == [0.5] * 4 + [-0.2] * 4 + [1.0, 1.0, 0.7, 0.7]
    assert space.names()[8:] == ["weight[rev]@layer0", "weight[rev]@layer1", "weight[rev]@layer2", "weight[rev]@layer3"]


def test_method_choice_and_global_genes():
    spec = {
        "method": ["ties", "dare_ties", "task_arithmetic"],
        "genes": {"weight": {"low": -1, "high": 1, "init": "1/N"}, "density": {"low": 0.1, "high": 1, "init": 0.5},
                  "lambda": {"low": 0.1, "high": 2, "init": 1}, "normalize": {"low": 0, "high": 1, "init": 1},
                  "rescale": False},
    }
    space = load_space(spec, experts=EXPERTS)
    assert space.names()[0] == "method" and space.lower[0] == 0 and space.upper[0] == 3
    assert space.names()[-2:] == ["lambda", "normalize"]
    x = space.x0.copy()
    assert space.to_recipe(x).method == "ties"
    x[0] = 1.7
    r = space.to_recipe(x)
    assert r.method == "dare_ties" and r.parameters == {"lambda": 1.0, "normalize": True, "rescale": False}
    x[0], x[-1] = 3.0, 0.2  # the upper bound maps to the last method; flags threshold at 0.5
    r = space.to_recipe(x)
    assert r.method == "task_arithmetic" and r.parameters == {"lambda": 1.0, "normalize": False}
    assert r.experts["add"].density == 1.0  # task_arithmetic declares no density
    assert space.to_recipe(space.to_vector(r)) == r
    assert space.penalty(np.abs(x)) == 0.0  # l1 0 by default


def test_staging_fixes_from_the_best_recipe():
    space = load_space("evo-merging", experts=EXPERTS)
    s1 = space.stage(0)
    assert s1.names() == ["density[add]", "density[mul]", "density[rev]"] and s1.stage_name == "denoising"
    best = s1.to_recipe(np.array([0.2, 0.9, 0.5]))
    assert [best.experts[e].weight for e in EXPERTS] == pytest.approx([1 / 3] * 3)
    s2 = space.stage(1, fixed_from=best)
    assert s2.names() == ["weight[add]", "weight[mul]", "weight[rev]"]
    np.testing.assert_allclose(s2.x0, [1 / 3] * 3)
    r = s2.to_recipe(np.array([-1.0, 0.5, 1.2]))
    assert [r.experts[e].density for e in EXPERTS] == [0.2, 0.9, 0.5]
    assert [r.experts[e].weight for e in EXPERTS] == [-1.0, 0.5, 1.2]
    # without a previous stage, the genes start where their init says
    assert [space.stage(1).to_recipe(np.zeros(3)).experts[e].density for e in EXPERTS] == [1.0] * 3
    assert s1.budget_fraction + s2.budget_fraction == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="no stage 2"):
        space.stage(2)


def test_penalty_is_l1_over_the_stage_genes():
    space = load_space("evo-merging", experts=EXPERTS)
    s2 = space.stage(1)
    assert s2.penalty(np.array([-1.5, 0.0, 0.3])) == pytest.approx(0.05 * 0.6)
    assert space.stage(0).penalty(np.ones(3)) == pytest.approx(0.05)
    custom = load_space({"preset": "evo-merging", "stages": [{"search": ["weight"], "l1": 0.5}]}, experts=EXPERTS)
    assert custom.n_stages == 1 and custom.stage(0).penalty(np.full(3, -2.0)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "genes, match",
    [
        ({"density": {"low": 0, "high": 1.5, "init": 1}}, r"genes\.density: \[0\.0, 1\.5\] is outside the domain \[0\.0, 1\.0\]"),
        ({"density": {"low": 0.5, "high": 0.4, "init": 0.45}}, "low 0.5 must be below high 0.4"),
        ({"weight": {"low": -1, "high": 1, "init": 2}}, "init 2.0 is outside"),
        ({"desnity": {"low": 0, "high": 1, "init": 1}}, "did you mean 'density'"),
        ({"density": 1.2}, r"genes\.density: 1\.2 is outside the domain"),
        ({"weight": {"low": -1, "high": 1, "init": "2/N"}}, '"1/N"'),
    ],
)
def test_bad_genes_are_config_errors_naming_the_gene(genes, match):
    with pytest.raises(ConfigError, match=match):
        load_space({"method": "evo_merging", "genes": genes}, experts=EXPERTS)


def test_bad_space_configs():
    with pytest.raises(ConfigError, match="does not divide the 6 layers; use one of \\[1, 2, 3, 6\\]"):
        load_space("ties-dare", experts=EXPERTS, n_layers=6)
    with pytest.raises(ConfigError, match="needs the number of layers"):
        load_space("layerwise", experts=EXPERTS)
    with pytest.raises(ConfigError, match="genes: Field required|unknown key"):
        load_space({"method": "ties", "gens": {}}, experts=EXPERTS)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.search: 'density' is fixed in `genes`"):
        load_space({"preset": "lorahub", "stages": [{"search": ["density"]}]}, experts=EXPERTS)
    with pytest.raises(ConfigError, match="unknown merge method 'tie'"):
        load_space({"method": "tie", "genes": {}}, experts=EXPERTS)
    with pytest.raises(ConfigError, match="searches no gene"):
        load_space({"method": "ties", "genes": {"density": 0.5}}, experts=EXPERTS)


def test_two_stage_search_with_cmaes():
    """The loop the search runs: stage 1, best recipe, stage 2 with it fixed."""
    space = load_space("evo-merging", experts=EXPERTS)
    target_density, target_weight = np.array([0.3, 0.8, 0.5]), np.array([0.9, -0.6, 0.2])

    def objective(recipe):
        d = np.array([recipe.experts[e].density for e in EXPERTS])
        w = np.array([recipe.experts[e].weight for e in EXPERTS])
        return float(np.sum((d - target_density) ** 2) + np.sum((w - target_weight) ** 2))

    best = None
    for i in range(space.n_stages):
        stage = space.stage(i, fixed_from=best)
        opt = optimizer_from_config({**stage.optimizer_hints, "sigma0": 0.2, "popsize": 8}, dim=stage.dim,
                                    lower=stage.lower, upper=stage.upper, x0=stage.x0, seed=i)
        for _ in range(40):
            cands = opt.ask(8)
            opt.tell([(c.id, objective(stage.to_recipe(c.x)) + stage.penalty(c.x)) for c in cands])
        best = stage.to_recipe(opt.best[1])
    np.testing.assert_allclose([best.experts[e].density for e in EXPERTS], target_density, atol=0.05)
    np.testing.assert_allclose([best.experts[e].weight for e in EXPERTS], target_weight, atol=0.05)
