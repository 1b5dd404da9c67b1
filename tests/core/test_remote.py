"""workbench.core.remote offline: the request is built and inspectable, nnsight's local simulation of the remote path
equals a local trace, and without a reachable host the call fails fast with a message naming it."""

import json
import socket
import time

import pytest
import torch

import workbench as wb
import workbench.core.remote as R
from workbench.testing.tiny import tiny_model

SITES = ["ln_final.hook_normalized", "blocks.0.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out",
         "blocks.2.hook_resid_post", "hook_embed"]
PROMPTS = ["hello world", "hi"]


@pytest.fixture
def model():
    m = tiny_model("llama")
    m.source = {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what a registry model carries
    return m


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.delenv("NDIF_HOST", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_simulation_of_the_remote_path_equals_a_local_trace(model):
    out = R.remote_trace(model, PROMPTS, SITES, remote="local")
    with wb.trace(model, SITES, positions=-1) as tr:
        model.hf(**model.encode(PROMPTS))
    assert set(out) == set(SITES)
    for site in SITES:
        assert torch.equal(out[site], tr[site]), site
    every = R.remote_trace(model, PROMPTS, ["blocks.1.hook_resid_post"], positions=None, remote="local")
    with wb.trace(model, ["blocks.1.hook_resid_post"]) as tr:
        model.hf(**model.encode(PROMPTS))
    assert torch.equal(every["blocks.1.hook_resid_post"], tr["blocks.1.hook_resid_post"])  # [2, T, d], left-padded


def test_the_request_is_built_without_a_network(model, monkeypatch):
    monkeypatch.setattr(R, "check_reachable", lambda *a, **k: pytest.fail("building a request must not connect"))
    req = R.build_remote_request(model, PROMPTS, SITES, api_key="secret")
    assert req.repo_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and req.api_key_set
    cls, _, key = req.model_key.partition(":")
    assert cls == "nnsight.modeling.transformers.TransformersModel"
    assert json.loads(key) == {"repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": None,
                               "task": "text-generation"}
    assert req.envelope["model_key"] == req.model_key and "attn_implementation" in req.envelope["env"]
    assert req.host == "https://api.ndif.us"  # nnsight's default host
    # forward order, each site read from the module the local trace hooks
    assert req.sites == ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out",
                         "blocks.2.hook_resid_post", "ln_final.hook_normalized"]
    assert req.reads == ["model.embed_tokens.output", "model.layers.0.input", "model.layers.1.self_attn.output",
                         "model.layers.1.mlp.output", "model.layers.2.output", "model.norm.output"]
    assert req.inputs["input_ids"].shape[0] == 2 and req.inputs["attention_mask"][1, 0] == 0  # left padding
    monkeypatch.setenv("NDIF_HOST", "http://ndif.example:5001")
    assert R.build_remote_request(model, PROMPTS, SITES, api_key="k").host == "http://ndif.example:5001"


def test_without_a_reachable_host_it_fails_fast_naming_the_host(model, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "dummy")
    host = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(R.RemoteUnavailable, match=rf"cannot reach the NDIF host {host} .*Remote execution needs"):
        R.remote_trace(model, PROMPTS, SITES, host=host, connect_timeout=3)
    assert time.monotonic() - t0 < 10


def test_a_silent_network_is_bounded_by_the_timeout(monkeypatch):
    def never(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(R.socket, "create_connection", never)  # DNS or SYN that never returns
    t0 = time.monotonic()
    with pytest.raises(R.RemoteUnavailable, match=r"https://ndif.example .*no answer within 1 s"):
        R.check_reachable("https://ndif.example", timeout=1)
    assert time.monotonic() - t0 < 5


def test_bad_requests_fail_before_any_network(model, monkeypatch):
    monkeypatch.setattr(R, "check_reachable", lambda *a, **k: pytest.fail("checked before the network"))
    with pytest.raises(ValueError, match="needs an NDIF API key"):
        R.remote_trace(model, PROMPTS, SITES)
    with pytest.raises(wb.SiteError, match="unknown hook 'resid' in site 'blocks.1.resid'"):
        R.remote_trace(model, PROMPTS, ["blocks.1.resid"], api_key="k")
    with pytest.raises(wb.SiteError, match="out of range"):
        R.remote_trace(model, PROMPTS, ["blocks.9.hook_resid_post"], api_key="k")
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        R.remote_trace(model, [], SITES, api_key="k")
    with pytest.raises(ValueError, match="positions must be an int"):
        R.remote_trace(model, PROMPTS, SITES, positions="last", api_key="k")
    with pytest.raises(ValueError, match="remote must be True"):
        R.remote_trace(model, PROMPTS, SITES, remote="cloud")
    with pytest.raises(ValueError, match="host must be an http"):
        R.remote_trace(model, PROMPTS, SITES, host="ndif.example", api_key="k")
    model.source = {}
    with pytest.raises(ValueError, match="names no hub id"):
        R.remote_trace(model, PROMPTS, SITES, api_key="k")
    with pytest.raises(TypeError, match="model must be a hub id"):
        R.remote_trace(3, PROMPTS, SITES, api_key="k")
