"""Loading what users write: repeated keys and names, hub ids, secrets, and the mergekit YAML that
mergekit users write every day (gradients, whole-model slices, per-layer slerp, model_stock,
passthrough, int8_mask, tokenizer_source)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.config import load_merge_config, load_search_config, open_pool
from evomerge.errors import ConfigError, EvomergeError, redact
from evomerge.materialize import merge_state_dict, write_model_dir
from evomerge.methods import get_method
from evomerge.recipe import Recipe, load_yaml_text
from tests.synthetic import make_base, make_full_expert

ATTN = "model.layers.{}.self_attn.q_proj.weight"
MLP = "model.layers.{}.mlp.up_proj.weight"
NORM = "model.layers.{}.input_layernorm.weight"


@pytest.fixture(scope="module")
def pool5(tmp_path_factory):
    """A 5-layer base and two full experts (paths relative to `root`, as a mergekit user writes them)."""
    root = tmp_path_factory.mktemp("pool5")
    base = make_base(root / "base", num_hidden_layers=5)
    for i in range(2):
        make_full_expert(base, root / f"e{i}", seed=10 + i)
    return root


def mergekit(root: Path, monkeypatch, data: dict):
    """Load a mergekit YAML from `root` as working directory, as `evomerge merge` would."""
    monkeypatch.chdir(root)
    (root / "mk.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_merge_config(root / "mk.yaml")


# ---- repeated names -------------------------------------------------------------------------


def test_repeated_yaml_key_is_refused_with_its_line(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text("pool:\n  base: base\n  experts:\n    math: a\n    code: b\n    math: c\n"
                      "recipe: {method: ties, experts: {math: {}, code: {}}}\n")
    with pytest.raises(ConfigError, match=r"merge.yaml:6: .*key 'math' is repeated \(first on line 4\)"):
        load_merge_config(config)


def test_repeated_key_in_a_flow_mapping_and_merge_keys_still_work():
    with pytest.raises(ConfigError, match="f.yaml:1: .*'a' is repeated"):
        load_yaml_text("{a: 1, a: 2}\n", "f.yaml")
    assert load_yaml_text("x: &d {a: 1}\ny: {<<: *d, a: 2}\n", "f.yaml") == {"x": {"a": 1}, "y": {"a": 2}}


def test_list_form_experts_with_one_folder_name_are_refused(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text("pool: {base: base, experts: [run1/checkpoint, run2/checkpoint]}\n"
                      "recipe: {method: ties, experts: {checkpoint: {}}}\n")
    with pytest.raises(ConfigError, match="run1/checkpoint and run2/checkpoint are both named 'checkpoint'.*mapping"):
        load_merge_config(config)


# ---- paths that are not local -----------------------------------------------------------------


def test_hub_id_says_hub_ids_are_not_supported_offline(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="'mistralai/Mistral-7B-v0.1' is not a local directory, and Hugging Face hub "
                                          "ids are not supported offline; download it first"):
        mergekit(tmp_path, monkeypatch, {"merge_method": "ties", "base_model": "mistralai/Mistral-7B-v0.1",
                                         "models": [{"model": "teknium/OpenHermes-2.5-Mistral-7B"}]})


def test_mergekit_model_plus_lora_form_is_refused(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    with pytest.raises(ConfigError, match="MODEL\\+LORA form is not supported; list the LoRA adapter as an expert"):
        mergekit(tmp_path, monkeypatch, {"merge_method": "task_arithmetic", "base_model": "base",
                                         "models": [{"model": "base+adapters/math"}]})


# ---- mergekit keys ----------------------------------------------------------------------------


def test_int8_mask_is_accepted_and_changes_nothing(pool5, monkeypatch, tmp_path):
    models = [{"model": "e0", "parameters": {"weight": 0.6, "density": 0.5}}, {"model": "e1", "parameters": {"weight": 0.4, "density": 0.7}}]
    with_mask, spec = mergekit(pool5, monkeypatch, {"merge_method": "ties", "base_model": "base", "models": models,
                                                    "parameters": {"int8_mask": True, "normalize": True}})
    without, _ = mergekit(pool5, monkeypatch, {"merge_method": "ties", "base_model": "base", "models": models,
                                               "parameters": {"normalize": True}})
    assert with_mask == without and with_mask.parameters == {"normalize": True}
    merge_state_dict(with_mask, open_pool(spec))  # and it merges


def test_gradient_is_interpolated_over_the_layers(pool5, monkeypatch):
    r, _ = mergekit(pool5, monkeypatch, {"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "e0", "parameters": {"weight": [1.0, 0.0, 1.0]}},   # 5 layers: t = 0, .25, .5, .75, 1
        {"model": "e1", "parameters": {"weight": [0.0, 0.5, 1.0]}}]})
    for layer, (w0, w1) in enumerate([(1, 0), (0.5, 0.25), (0, 0.5), (0.5, 0.75), (1, 1)]):
        assert r.plan(MLP.format(layer)).weights == pytest.approx((w0, w1))
    assert r.plan("model.embed_tokens.weight").weights == (1.0, 0.0)  # outside the layers: t = 0, as mergekit
    assert r.plan("lm_head.weight").weights == (1.0, 0.0)


def test_filters_take_the_first_match_as_mergekit_does(pool5, monkeypatch):
    r, _ = mergekit(pool5, monkeypatch, {"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "e0", "parameters": {"weight": [{"value": 0.5}, {"filter": "self_attn", "value": 0.2}]}},
        {"model": "e1", "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"filter": "up_proj", "value": 0.9},
                                                  {"value": 0.7}]}}]})
    assert r.plan(ATTN.format(1)).weights == (0.5, 0.7)  # e0's unfiltered entry comes first: it always wins
    assert r.plan(MLP.format(1)).weights == (0.5, 0.3)  # mlp before up_proj


def test_top_level_weight_applies_to_every_model_and_a_models_own_wins(pool5, monkeypatch):
    r, _ = mergekit(pool5, monkeypatch, {"merge_method": "ties", "base_model": "base", "parameters": {"weight": 0.3, "density": 0.5},
                                         "models": [{"model": "e0"}, {"model": "e1", "parameters": {"weight": 0.8}}]})
    assert r.experts["e0"].weight == 0.3 and r.experts["e1"].weight == 0.8
    assert r.experts["e0"].density == r.experts["e1"].density == 0.5 and r.parameters == {}


SLERP = {  # the slerp config from mergekit's README and most model cards, on a 5-layer model
    "slices": [{"sources": [{"model": "base", "layer_range": [0, 5]}, {"model": "e1", "layer_range": [0, 5]}]}],
    "merge_method": "slerp", "base_model": "base",
    "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                         {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
    "dtype": "float32",
}


def test_whole_model_slice_with_per_layer_slerp(pool5, monkeypatch):
    r, spec = mergekit(pool5, monkeypatch, SLERP)
    assert list(r.experts) == ["e1"] and r.method == "slerp"
    for layer, (attn, mlp) in enumerate(zip([0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0])):
        assert r.plan(ATTN.format(layer)).parameters["t"] == pytest.approx(attn)
        assert r.plan(MLP.format(layer)).parameters["t"] == pytest.approx(mlp)
        assert r.plan(NORM.format(layer)).parameters["t"] == 0.5
    pool = open_pool(spec)
    merged = merge_state_dict(r, pool)
    name = ATTN.format(3)  # each tensor is slerp'ed with its own layer's t
    base = pool.base_tensor(name)
    expected = get_method("slerp").merge(base, [pool.task_vector("e1", name)], None, None, {"t": 0.7})
    torch.testing.assert_close(merged[name], expected)


@pytest.mark.parametrize("slices, message", [
    ([{"sources": [{"model": "e0", "layer_range": [0, 3]}]}, {"sources": [{"model": "e1", "layer_range": [2, 5]}]}],
     "slices: slices that stack layers \\(a frankenmerge\\) are not supported"),
    ([{"sources": [{"model": "e0", "layer_range": [1, 5]}, {"model": "e1", "layer_range": [1, 5]}]}],
     "layer_range \\[1, 5\\]: only whole models are merged"),
    ([{"sources": [{"model": "e0", "layer_range": [0, 4]}, {"model": "e1", "layer_range": [0, 4]}]}],
     "slices\\[0\\] covers layers \\[0, 4\\) but the base has 5"),
])
def test_slices_that_are_not_whole_models_are_refused(pool5, monkeypatch, slices, message):
    data = {**SLERP, "slices": slices, "merge_method": "ties", "parameters": {"weight": [0.2, 0.8]}}
    with pytest.raises(ConfigError, match=message):
        mergekit(pool5, monkeypatch, data)


def test_passthrough_of_one_whole_model_is_that_model(pool5, monkeypatch):
    r, spec = mergekit(pool5, monkeypatch, {"merge_method": "passthrough", "models": [{"model": "e0"}]})
    pool = open_pool(spec)
    for name, tensor in merge_state_dict(r, pool).items():
        assert torch.equal(tensor, pool.experts["e0"].files.get(name).float()), name


def test_passthrough_layer_stacking_is_refused(pool5, monkeypatch):
    with pytest.raises(ConfigError, match="frankenmerge.*build the stacked model with mergekit"):
        mergekit(pool5, monkeypatch, {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "e0", "layer_range": [0, 4]}]}, {"sources": [{"model": "e1", "layer_range": [3, 5]}]}]})


def test_model_stock_from_mergekit_yaml(pool5, monkeypatch):
    r, spec = mergekit(pool5, monkeypatch, {"merge_method": "model_stock", "base_model": "base",
                                            "models": [{"model": "base"}, {"model": "e0"}, {"model": "e1"}]})
    assert r.method == "model_stock" and list(r.experts) == ["e0", "e1"]
    pool = open_pool(spec)
    name = MLP.format(2)
    taus = [pool.task_vector(e, name).double().reshape(-1) for e in ("e0", "e1")]
    cos = (taus[0] @ taus[1]) / (taus[0].norm() * taus[1].norm())
    t = 2 * cos / (1 + cos)  # the paper's ratio for N = 2
    expected = pool.base_tensor(name).double() + t * (taus[0] + taus[1]).reshape(pool.base.shape(name)) / 2
    torch.testing.assert_close(merge_state_dict(r, pool)[name], expected.float(), atol=1e-5, rtol=1e-5)


def test_tokenizer_source_names_whose_tokenizer_is_copied(pool5, monkeypatch, tmp_path):
    for folder in ("base", "e1"):
        (pool5 / folder / "tokenizer_config.json").write_text(json.dumps({"from": folder}))
    r, spec = mergekit(pool5, monkeypatch, {"merge_method": "task_arithmetic", "base_model": "base",
                                            "models": [{"model": "e0"}, {"model": "e1"}], "tokenizer_source": "e1"})
    out = write_model_dir(r, open_pool(spec), tmp_path / "merged")
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "e1"}
    r, spec = mergekit(pool5, monkeypatch, {"merge_method": "task_arithmetic", "base_model": "base",
                                            "models": [{"model": "e0"}], "tokenizer_source": "base"})
    out = write_model_dir(r, open_pool(spec), tmp_path / "merged-base")
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "base"}


@pytest.mark.parametrize("extra, message", [
    ({"tokenizer_source": "union"}, "tokenizer_source: union builds a merged vocabulary.*write tokenizer_source: base"),
    ({"tokenizer": {"source": "union"}}, "tokenizer: building a tokenizer is not supported; write `tokenizer_source: base`"),
    ({"chat_template": "chatml"}, "chat_template: not supported"),
    ({"modules": {"text_decoder": {}}}, "modules: per-module merges are not supported; write one `models:` list"),
    ({"merge_method": "sce"}, "merge_method 'sce' has no evomerge equivalent \\(supported: .*model_stock, passthrough"),
    ({"lazy_unpickle": True}, "lazy_unpickle: not a mergekit key evomerge reads"),
])
def test_unsupported_mergekit_keys_are_named_with_what_to_write(pool5, monkeypatch, extra, message):
    data = {"merge_method": "ties", "base_model": "base", "models": [{"model": "e0"}], **extra}
    with pytest.raises(ConfigError, match=message):
        mergekit(pool5, monkeypatch, data)


# ---- which experts a recipe uses ---------------------------------------------------------------


def test_used_experts_are_those_with_a_nonzero_weight_somewhere():
    r = Recipe.from_dict({"method": "ties", "experts": {"a": {"weight": 0.5}, "b": {"weight": 0.0}, "c": {"density": 0.0},
                                                        "d": {"weight": 0.0}},
                          "overrides": [{"modules": "mlp", "experts": {"d": {"weight": 0.3}}}]})
    assert r.used_experts() == ["a", "d"]
    assert Recipe.from_dict({"method": "slerp", "experts": {"a": {"weight": 0.0}}}).used_experts() == ["a"]


# ---- secrets ----------------------------------------------------------------------------------


def search_config(tmp_path, backend: dict) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"pool": {"base": "base", "experts": {"a": "a"}}, "suite": "suite.yaml",
                                    "backend": backend}))
    return path


@pytest.mark.parametrize("backend, where", [
    ({"name": "openai", "base_url": "https://user:hunter2@api.example.com/v1"}, "backend.base_url: .*user:password@"),
    ({"name": "openai", "base_url": "https://api.example.com/v1?api_key=abc123"}, "backend.base_url: .*api_key= in the URL"),
    ({"name": "openai", "password": "hunter2"}, "backend.password: secrets never go in a config"),
    ({"name": "openai", "headers": {"Authorization": "Bearer abc"}}, "backend.headers.Authorization: secrets never"),
    ({"name": "openai", "hf_token": "abc"}, "backend.hf_token: secrets never"),
    ({"name": "openai", "model": "sk-proj-abcdefghijklmnop"}, "backend.model: .*a value shaped like an API key"),
])
def test_secrets_in_a_search_config_are_refused(tmp_path, backend, where):
    with pytest.raises(ConfigError, match=where + ".*environment variable.*api_key_env"):
        load_search_config(search_config(tmp_path, backend))


def test_secret_free_config_with_env_var_names_loads(tmp_path):
    config = load_search_config(search_config(tmp_path, {"name": "openai", "base_url": "http://localhost:8000/v1",
                                                         "api_key_env": "MY_KEY", "echo_max_tokens": 1}))
    assert config.backend["api_key_env"] == "MY_KEY"


def test_redact_hides_given_secrets_and_key_shapes():
    text = redact("bad key hunter2-long, sk-abcdefghijkl, at http://u:p@h/v1, Bearer abcdefghijkl", ("hunter2-long",))
    assert "hunter2" not in text and "sk-abc" not in text and "u:p@" not in text and "Bearer abcdef" not in text


class _EchoingServer(BaseHTTPRequestHandler):
    """An endpoint that echoes the credentials it was sent in its error, as some do."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"error": {"message": f"invalid credentials {self.headers.get('Authorization')}",
                                     "type": "invalid_request_error"}}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def echoing_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_endpoint_error_that_echoes_the_api_key_is_redacted(echoing_server, monkeypatch):
    from evomerge.backends.openai_api import OpenAIBackend

    monkeypatch.setenv("EVOMERGE_TEST_KEY", "my-very-secret-key-123")
    with pytest.raises(EvomergeError) as raised:
        OpenAIBackend(echoing_server + "/v1", api_key_env="EVOMERGE_TEST_KEY", max_retries=0)
    assert "answered 400" in str(raised.value) and "my-very-secret-key-123" not in str(raised.value)


def test_provider_error_that_echoes_the_token_is_redacted(echoing_server):
    from evomerge.provider import ProviderError, request

    with pytest.raises(ProviderError) as raised:
        request(echoing_server, "/v1/pool", "tok-0123456789", retries=1)
    assert "HTTP 400" in str(raised.value) and "tok-0123456789" not in str(raised.value)


def test_a_partial_slice_is_refused_without_a_gradient_too(pool5, monkeypatch):
    # scalar parameters read no layer count, and [0, 4] of a 5-layer base was merged as the whole model
    data = {**SLERP, "merge_method": "linear", "parameters": {"weight": 0.5},
            "slices": [{"sources": [{"model": "e0", "layer_range": [0, 4]}, {"model": "e1", "layer_range": [0, 4]}]}]}
    with pytest.raises(ConfigError, match="slices\\[0\\] covers layers \\[0, 4\\) but the base has 5"):
        mergekit(pool5, monkeypatch, data)
