"""File gateways (TrueFoundry, LiteLLM config.yaml, Portkey): only weights change, bad files are refused clearly."""

import json
import os
from pathlib import Path

import pytest
import yaml

from shadowjudge.config import GatewayConfig, parse_config
from shadowjudge.errors import InputError
from shadowjudge.gateways import GatewayConfigInvalid, GatewayRejected, get_gateway
from shadowjudge.gateways.files import previous_revision_path
from shadowjudge.routing.push import push_weights


def make_route(kind: str, path: Path, **gateway):
    cfg = parse_config({
        "sources": [{"name": "logs", "path": "x.jsonl"}],
        "routes": [{
            "name": "chat",
            "incumbent": {"name": "inc", "model": "openai-main/gpt-4o", "base_url": "http://127.0.0.1:9000/v1",
                          "api_key_env": "INC_KEY"},
            "candidates": [{"name": "cand", "model": "azure-eu/gpt-4o-mini", "base_url": "http://127.0.0.1:9001/v1",
                            "api_key_env": "CAND_KEY"}],
            "gateway": {"kind": kind, "path": str(path), **gateway},
        }],
    })
    route = cfg.routes[0]
    return route, get_gateway(route.gateway, route)


TRUEFOUNDRY = """\
# Company routing config, edited by hand too.
name: corp-routing
type: gateway-load-balancing-config
model_configs:
  - model: openai-main/gpt-4o
    usage_limits:
      tokens_per_minute: 50000
rules:
  - id: embeddings   # another team's rule: left alone
    type: weight-based-routing
    when:
      models: [embed]
    load_balance_targets:
      - target: openai-main/text-embedding-3-small
        weight: 100
  - id: chat
    type: weight-based-routing
    when:
      models: [chat]
      metadata:
        environment: production
    load_balance_targets:
      - target: openai-main/gpt-4o
        weight: 100
        retry_config:
          attempts: 2
        metadata_match:
          tier: gold
      - target: legacy/old-model  # retired, kept at 0
        weight: 0
"""


def test_truefoundry_push_changes_only_the_route_weights(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(TRUEFOUNDRY)
    route, gw = make_route("truefoundry", path)
    assert gw.read_current().weights == {"inc": 100}
    result = push_weights(gw, {"inc": 90, "cand": 10})
    assert result.ok and result.observed == {"inc": 90, "cand": 10}
    text = path.read_text()
    assert "# Company routing config" in text and "# another team's rule: left alone" in text and "# retired" in text
    before, after = yaml.safe_load(TRUEFOUNDRY), yaml.safe_load(text)
    chat = after["rules"][1]["load_balance_targets"]
    assert chat[0] == {"target": "openai-main/gpt-4o", "weight": 90, "retry_config": {"attempts": 2},
                       "metadata_match": {"tier": "gold"}}
    assert chat[1] == {"target": "legacy/old-model", "weight": 0}
    assert chat[2] == {"target": "azure-eu/gpt-4o-mini", "weight": 10}
    after["rules"][1]["load_balance_targets"] = before["rules"][1]["load_balance_targets"]
    assert after == before  # nothing else moved
    assert previous_revision_path(path).read_text() == TRUEFOUNDRY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing.yaml", "routing.yaml.prev"]  # no temp files left


def test_a_new_gateway_file_is_readable_by_the_proxy_and_a_symlinked_one_stays_a_link(tmp_path):
    fresh = tmp_path / "new" / "routing.yaml"
    _, gw = make_route("truefoundry", fresh)
    assert push_weights(gw, {"inc": 100, "cand": 0}).ok
    assert fresh.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: the gateway may run as another user

    private = tmp_path / "private.yaml"
    private.write_text(TRUEFOUNDRY)
    private.chmod(0o600)
    _, gw = make_route("truefoundry", private)
    assert push_weights(gw, {"inc": 90, "cand": 10}).ok
    assert private.stat().st_mode & 0o777 == 0o600  # an existing file keeps its mode

    real = tmp_path / "deploy" / "routing.yaml"
    real.parent.mkdir()
    real.write_text(TRUEFOUNDRY)
    link = tmp_path / "routing-link.yaml"
    link.symlink_to(real)
    _, gw = make_route("truefoundry", link)
    assert push_weights(gw, {"inc": 80, "cand": 20}).ok
    assert link.is_symlink() and gw.read_current().weights == {"inc": 80, "cand": 20}
    assert "weight: 20" in real.read_text()


def test_one_file_reached_by_two_spellings_is_one_gateway_and_so_one_lock(tmp_path):
    (tmp_path / "sub").mkdir()
    _, direct = make_route("truefoundry", tmp_path / "routing.yaml")
    _, roundabout = make_route("truefoundry", tmp_path / "sub" / ".." / "routing.yaml")
    assert direct.name == roundabout.name


def test_one_file_reached_through_a_symlinked_folder_or_a_double_slash_is_one_lock(tmp_path):
    """Two routes sharing a file, one naming it through a link, took two locks: one route's push was lost."""
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    spellings = [tmp_path / "real" / "routing.yaml", tmp_path / "linked" / "routing.yaml",
                 "/" + str(tmp_path / "real" / "routing.yaml")]
    assert len({make_route("truefoundry", spelling)[1].name for spelling in spellings}) == 1


def test_the_previous_revision_keeps_the_mode_of_a_private_file(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(TRUEFOUNDRY)
    path.chmod(0o600)
    _, gw = make_route("truefoundry", path)
    assert push_weights(gw, {"inc": 90, "cand": 10}).ok
    assert previous_revision_path(path).stat().st_mode & 0o777 == 0o600  # was 0644: readable by every user


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file to another user")
def test_a_push_as_root_keeps_the_owner_of_the_gateway_file_and_its_previous_revision(tmp_path):
    """A gateway running as its own user could no longer read its config once root pushed it."""
    path = tmp_path / "routing.yaml"
    path.write_text(TRUEFOUNDRY)
    os.chown(path, 1000, 1001)
    path.chmod(0o640)
    _, gw = make_route("truefoundry", path)
    assert push_weights(gw, {"inc": 90, "cand": 10}).ok
    for written in (path, previous_revision_path(path)):
        st = written.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1000, 1001, 0o640), written

def test_truefoundry_virtual_model_group_shape(tmp_path):
    path = tmp_path / "vm.yaml"
    path.write_text("name: team-models\nintegrations:\n  - name: chat\n    model_types: [chat]\n    routing_config:\n"
                    "      type: weight-based-routing\n      sticky_routing: {ttl_seconds: 600}\n"
                    "      load_balance_targets:\n        - target: openai-main/gpt-4o\n          weight: 100\n")
    _, gw = make_route("truefoundry", path)
    assert push_weights(gw, {"inc": 75, "cand": 25}).ok
    config = yaml.safe_load(path.read_text())["integrations"][0]["routing_config"]
    assert config["sticky_routing"] == {"ttl_seconds": 600}
    assert [(t["target"], t["weight"]) for t in config["load_balance_targets"]] == [
        ("openai-main/gpt-4o", 75), ("azure-eu/gpt-4o-mini", 25)]


@pytest.mark.parametrize("text, message", [
    ("rules:\n  - id: chat\n    type: latency-based-routing\n    when: {models: [chat]}\n"
     "    load_balance_targets:\n      - target: openai-main/gpt-4o\n", "route weights need 'weight-based-routing'"),
    ("rules:\n  - id: chat\n    when: {models: [chat]}\n    load_balance_targets:\n"
     "      - target: someone/else\n        weight: 30\n      - target: openai-main/gpt-4o\n        weight: 70\n",
     "'someone/else' holds weight 30 but is not a target"),
    ("rules: [\n", "not valid YAML"),
    ("rules:\n  - id: chat\n    load_balance_targets:\n      - target: openai-main/gpt-4o\n        weight: 1.5\n",
     "'weight' must be an integer"),
])
def test_truefoundry_refuses_files_it_cannot_safely_change(tmp_path, text, message):
    path = tmp_path / "routing.yaml"
    path.write_text(text)
    _, gw = make_route("truefoundry", path)
    with pytest.raises(GatewayConfigInvalid, match=message):
        gw.read_current()
    result = push_weights(gw, {"inc": 50, "cand": 50})
    assert not result.ok and message in result.error
    assert path.read_text() == text


def test_a_failing_reload_command_puts_the_previous_file_back(tmp_path):
    path = tmp_path / "routing.yaml"
    seen = tmp_path / "seen-path"
    _, ok_gw = make_route("truefoundry", path, reload_command=["sh", "-c", f"echo {{path}} > {seen}"])
    assert push_weights(ok_gw, {"inc": 100, "cand": 0}).ok
    assert seen.read_text().strip() == str(path)  # {path} is substituted
    good = path.read_text()
    _, bad_gw = make_route("truefoundry", path, reload_command=["sh", "-c", "echo 'apply failed: 503' >&2; exit 4"])
    result = push_weights(bad_gw, {"inc": 50, "cand": 50})
    assert not result.ok and "exited 4: apply failed: 503" in result.error
    assert path.read_text() == good


def test_weights_that_do_not_sum_to_100_are_never_rendered(tmp_path):
    _, gw = make_route("truefoundry", tmp_path / "routing.yaml")
    with pytest.raises(GatewayRejected, match="sum to 100"):
        gw.render(gw.read_current(), {"inc": 90, "cand": 5})
    assert not (tmp_path / "routing.yaml").exists()


LITELLM = """\
model_list:
  - model_name: chat
    litellm_params:
      model: openai/gpt-4o
      api_base: https://api.openai.com/v1
      api_key: os.environ/OPENAI_API_KEY
      weight: 100
    model_info:
      id: inc
  - model_name: embed
    litellm_params:
      model: openai/text-embedding-3-small
router_settings:
  routing_strategy: simple-shuffle
  num_retries: 2
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
"""


def test_routes_sharing_one_litellm_config_each_get_their_own_deployment_ids(tmp_path):
    """One proxy config for every route is LiteLLM's usual set-up; two routes may both have a target named 'cand'."""
    path = tmp_path / "config.yaml"
    path.write_text(LITELLM)
    chat, gw_chat = make_route("litellm", path)
    assert push_weights(gw_chat, {"inc": 80, "cand": 20}).ok
    summarize = chat.model_copy(update={"name": "summarize"})
    gw_summarize = get_gateway(summarize.gateway, summarize)
    assert push_weights(gw_summarize, {"inc": 90, "cand": 10}).ok
    ids = [d["model_info"]["id"] for d in yaml.safe_load(path.read_text())["model_list"] if "model_info" in d]
    assert ids == ["inc", "chat/cand", "summarize/inc", "summarize/cand"]  # 'inc' as an older version wrote it
    assert gw_chat.read_current().weights == {"inc": 80, "cand": 20}
    assert gw_summarize.read_current().weights == {"inc": 90, "cand": 10}


def test_litellm_config_sets_deployment_weights_and_adds_missing_targets_without_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("CAND_KEY", "sk-secret-value")
    path = tmp_path / "config.yaml"
    path.write_text(LITELLM)
    _, gw = make_route("litellm", path)
    assert gw.read_current().weights == {"inc": 100}
    assert push_weights(gw, {"inc": 80, "cand": 20}).ok
    text = path.read_text()
    doc = yaml.safe_load(text)
    chat = [d for d in doc["model_list"] if d["model_name"] == "chat"]
    assert [d["litellm_params"]["weight"] for d in chat] == [80, 20]
    assert chat[1] == {"model_name": "chat", "litellm_params": {
        "model": "openai/azure-eu/gpt-4o-mini", "api_base": "http://127.0.0.1:9001/v1", "api_key": "os.environ/CAND_KEY",
        "weight": 20}, "model_info": {"id": "chat/cand"}}
    assert doc["router_settings"] == {"routing_strategy": "simple-shuffle", "num_retries": 2}
    assert doc["model_list"][1] == {"model_name": "embed", "litellm_params": {"model": "openai/text-embedding-3-small"}}
    assert "sk-secret-value" not in text


def test_litellm_config_refuses_a_strategy_that_ignores_weights(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(LITELLM.replace("simple-shuffle", "latency-based-routing"))
    _, gw = make_route("litellm", path)
    result = push_weights(gw, {"inc": 80, "cand": 20})
    assert not result.ok and "only apply with 'simple-shuffle'" in result.error


PORTKEY = {
    "strategy": {"mode": "loadbalance"},
    "retry": {"attempts": 3},
    "targets": [
        {"virtual_key": "inc", "weight": 0.7, "override_params": {"model": "gpt-4o"}},
        {"virtual_key": "old-key", "weight": 0},
        {"provider": "openai", "custom_host": "http://127.0.0.1:9001/v1",
         "override_params": {"model": "azure-eu/gpt-4o-mini"}, "weight": 0.3},
    ],
}


def test_portkey_tells_targets_that_share_a_model_apart_by_their_host(tmp_path):
    """The same open model served by two providers (a candidate that only changes where it runs)."""
    path = tmp_path / "portkey.json"
    route, _ = make_route("portkey", path)
    keyless = {"api_key_env": None}  # ShadowJudge adds entries only for targets that need no key
    same_model = route.model_copy(update={"incumbent": route.incumbent.model_copy(update=keyless), "candidates": [
        route.candidates[0].model_copy(update={"model": route.incumbent.model, **keyless})]})
    gw = get_gateway(same_model.gateway, same_model)
    assert push_weights(gw, {"inc": 100, "cand": 0}).ok
    assert push_weights(gw, {"inc": 70, "cand": 30}).ok
    hosts = {e["custom_host"]: e["weight"] for e in json.loads(path.read_text())["targets"]}
    assert hosts == {"http://127.0.0.1:9000/v1": 0.7, "http://127.0.0.1:9001/v1": 0.3}
    assert gw.read_current().weights == {"inc": 70, "cand": 30}


def test_portkey_config_writes_fractions_and_keeps_other_keys(tmp_path):
    path = tmp_path / "portkey.json"
    path.write_text(json.dumps(PORTKEY))
    _, gw = make_route("portkey", path)
    assert gw.read_current().weights == {"inc": 70, "cand": 30}
    assert push_weights(gw, {"inc": 95, "cand": 5}).ok
    doc = json.loads(path.read_text())
    assert doc["retry"] == {"attempts": 3}
    assert [t["weight"] for t in doc["targets"]] == [0.95, 0, 0.05]
    assert doc["targets"][1] == {"virtual_key": "old-key", "weight": 0}


@pytest.mark.parametrize("doc, message", [
    ({"strategy": {"mode": "fallback"}, "targets": []}, "route weights need 'loadbalance'"),
    ({"strategy": {"mode": "loadbalance"}, "targets": [{"virtual_key": "stranger", "weight": 0.5}]},
     "holds weight 0.5 but is not one target"),
])
def test_portkey_refuses_configs_it_cannot_weight(tmp_path, doc, message):
    path = tmp_path / "portkey.json"
    path.write_text(json.dumps(doc))
    _, gw = make_route("portkey", path)
    result = push_weights(gw, {"inc": 50, "cand": 50})
    assert not result.ok and message in result.error
    assert json.loads(path.read_text()) == doc


def test_get_gateway_says_what_a_gateway_config_lacks(tmp_path):
    route, _ = make_route("truefoundry", tmp_path / "x.yaml")
    with pytest.raises(InputError, match="needs 'path'"):
        get_gateway(GatewayConfig(kind="portkey"), route)
    with pytest.raises(InputError, match="needs 'url'"):
        get_gateway(GatewayConfig(kind="litellm_api"), route)


@pytest.mark.parametrize("kind, example", [("truefoundry", "truefoundry-routing.yaml"),
                                           ("litellm", "litellm-config.yaml"), ("portkey", "portkey-config.json")])
def test_the_shipped_example_gateway_configs_work_with_the_worked_example_route(tmp_path, kind, example):
    from shadowjudge.config import load_config

    repo = Path(__file__).resolve().parents[1]
    route = load_config(repo / "configs" / "shadowjudge.yaml").route("chat-default")
    copy = tmp_path / example
    copy.write_text((repo / "configs" / "gateways" / example).read_text())
    gw = get_gateway(GatewayConfig(kind=kind, path=str(copy)), route)
    assert gw.read_current().weights == {"claude-instant": 100, "yi-34b": 0, "llama-2-7b": 0}
    assert push_weights(gw, {"claude-instant": 75, "yi-34b": 25, "llama-2-7b": 0}).ok


@pytest.mark.parametrize("fault", ["reload fails", "reload rejects the new text only", "reads back other weights"])
def test_a_failed_push_leaves_the_file_and_its_prev_as_they_were(tmp_path, monkeypatch, fault):
    """`.prev` is where a person looks for the last good config: after a restored push it used to hold the
    rejected rendering (read-back case) or a copy of the current file (reload case)."""
    path = tmp_path / "routing.yaml"
    path.write_text(TRUEFOUNDRY)
    _, gw = make_route("truefoundry", path)
    assert push_weights(gw, {"inc": 90, "cand": 10}).ok
    good, older = path.read_text(), previous_revision_path(path).read_text()
    assert older == TRUEFOUNDRY

    if fault == "reload fails":
        _, gw = make_route("truefoundry", path, reload_command=["sh", "-c", "exit 3"])
    elif fault == "reload rejects the new text only":  # the restore's reload then succeeds
        _, gw = make_route("truefoundry", path, reload_command=["sh", "-c", "! grep -q 'weight: 50' {path}"])
    else:
        monkeypatch.setattr(type(gw), "read_back", lambda self: {"inc": 1, "cand": 99}, raising=True)
    result = push_weights(gw, {"inc": 50, "cand": 50})
    assert not result.ok
    assert path.read_text() == good and previous_revision_path(path).read_text() == older
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing.yaml", "routing.yaml.prev"]


def test_a_failed_first_push_leaves_no_prev_behind(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(TRUEFOUNDRY)
    _, gw = make_route("truefoundry", path, reload_command=["sh", "-c", "exit 3"])
    assert not push_weights(gw, {"inc": 50, "cand": 50}).ok
    assert path.read_text() == TRUEFOUNDRY and not previous_revision_path(path).exists()


def retried(route, **candidate):
    """The route with its candidate shipped again under the same name (a new model or endpoint after a failure)."""
    return route.model_copy(update={"candidates": [route.candidates[0].model_copy(update=candidate)]})


def test_litellm_points_a_retried_target_at_its_new_model_and_endpoint(tmp_path):
    """The deployment is found by model_info.id; only its weight used to be set, so the ramp-up after a retry sent
    traffic to the model that had been rolled back."""
    path = tmp_path / "config.yaml"
    route, gw = make_route("litellm", path)
    assert push_weights(gw, {"inc": 95, "cand": 5}).ok
    assert push_weights(gw, {"inc": 100, "cand": 0}).ok  # rolled back
    fixed = retried(route, model="azure-eu/gpt-4o-mini-v2", base_url="http://127.0.0.1:9002/v1",
                    api_key_env="CAND2_KEY")
    assert push_weights(get_gateway(fixed.gateway, fixed), {"inc": 95, "cand": 5}).ok
    chat = {d["model_info"]["id"]: d["litellm_params"] for d in yaml.safe_load(path.read_text())["model_list"]}
    assert chat["chat/cand"] == {"model": "openai/azure-eu/gpt-4o-mini-v2", "api_base": "http://127.0.0.1:9002/v1",
                                 "api_key": "os.environ/CAND2_KEY", "weight": 5}
    assert chat["chat/inc"]["model"] == "openai/openai-main/gpt-4o"  # a target that did not move keeps its deployment


def test_truefoundry_points_an_entry_named_for_a_target_at_the_target_model(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text("name: corp\ntype: gateway-load-balancing-config\nrules:\n"
                    "  - id: chat\n    when: {models: [chat]}\n    load_balance_targets:\n"
                    "      - target: openai-main/gpt-4o\n        weight: 100\n"
                    "      - target: cand\n        weight: 0\n        retry_config: {attempts: 2}\n")
    _, gw = make_route("truefoundry", path)
    assert push_weights(gw, {"inc": 90, "cand": 10}).ok
    entries = yaml.safe_load(path.read_text())["rules"][0]["load_balance_targets"]
    assert entries == [{"target": "openai-main/gpt-4o", "weight": 90},
                       {"target": "azure-eu/gpt-4o-mini", "weight": 10, "retry_config": {"attempts": 2}}]


def test_portkey_points_an_entry_named_for_a_target_at_its_new_model_and_host(tmp_path):
    path = tmp_path / "portkey.json"
    path.write_text(json.dumps({"strategy": {"mode": "loadbalance"}, "targets": [
        {"virtual_key": "inc", "override_params": {"model": "openai-main/gpt-4o"}, "weight": 1},
        {"virtual_key": "cand", "custom_host": "http://127.0.0.1:9001/v1",
         "override_params": {"model": "azure-eu/gpt-4o-mini", "temperature": 0}, "weight": 0}]}))
    route, _ = make_route("portkey", path)
    fixed = retried(route, model="azure-eu/gpt-4o-mini-v2", base_url="http://127.0.0.1:9002/v1")
    assert push_weights(get_gateway(fixed.gateway, fixed), {"inc": 95, "cand": 5}).ok
    inc, cand = json.loads(path.read_text())["targets"]
    assert cand == {"virtual_key": "cand", "custom_host": "http://127.0.0.1:9002/v1",
                    "override_params": {"model": "azure-eu/gpt-4o-mini-v2", "temperature": 0}, "weight": 0.05}
    assert inc == {"virtual_key": "inc", "override_params": {"model": "openai-main/gpt-4o"}, "weight": 0.95}


def test_portkey_counts_a_target_without_weight_as_one_as_portkey_does(tmp_path):
    """Portkey's selectProviderByWeight reads a missing weight as 1; it was read as 0, so an unlisted fallback took
    half the traffic while the push reported inc=95, cand=5."""
    path = tmp_path / "portkey.json"
    path.write_text(json.dumps({"strategy": {"mode": "loadbalance"},
                                "targets": [{"virtual_key": "inc", "weight": 1}, {"virtual_key": "cand"}]}))
    _, gw = make_route("portkey", path)
    assert gw.read_current().weights == {"inc": 50, "cand": 50}

    stranger = {"strategy": {"mode": "loadbalance"},
                "targets": [{"virtual_key": "inc", "weight": 1}, {"virtual_key": "legacy-fallback"}]}
    path.write_text(json.dumps(stranger))
    result = push_weights(gw, {"inc": 95, "cand": 5})
    assert not result.ok and "no 'weight', which Portkey counts as 1" in result.error
    assert json.loads(path.read_text()) == stranger


def test_portkey_adds_entries_only_for_targets_that_need_no_key(tmp_path):
    """A Portkey config cannot reference an env var and a key is never written, so an entry ShadowJudge added for a
    keyed target reached it without a key."""
    path = tmp_path / "portkey.json"
    doc = {"strategy": {"mode": "loadbalance"}, "targets": [{"virtual_key": "inc", "weight": 1}]}
    path.write_text(json.dumps(doc))
    route, gw = make_route("portkey", path)  # cand reads its key from CAND_KEY
    result = push_weights(gw, {"inc": 100, "cand": 0})
    assert not result.ok and "target 'cand', which needs a key" in result.error and "virtual_key" in result.error
    assert json.loads(path.read_text()) == doc
    keyless = retried(route, api_key_env=None)
    assert push_weights(get_gateway(keyless.gateway, keyless), {"inc": 100, "cand": 0}).ok
    assert json.loads(path.read_text())["targets"][1] == {
        "provider": "openai", "custom_host": "http://127.0.0.1:9001/v1",
        "override_params": {"model": "azure-eu/gpt-4o-mini"}, "weight": 0}


LITELLM_WEIGHTLESS_FIRST = """\
model_list:
  - model_name: chat
    litellm_params: {model: openai/azure-eu/gpt-4o-mini, api_base: "http://127.0.0.1:9001/v1"}
    model_info: {id: chat/cand}
  - model_name: chat
    litellm_params: {model: openai/openai-main/gpt-4o, api_base: "http://127.0.0.1:9000/v1", weight: 100}
    model_info: {id: chat/inc}
"""


def test_litellm_reads_what_simple_shuffle_serves_and_writes_every_weight(tmp_path):
    """simple-shuffle ignores every weight when the first deployment has none: this file splits 50/50, and was read
    as inc=100, cand=0 (so a hold step saw nothing to reconcile)."""
    path = tmp_path / "config.yaml"
    path.write_text(LITELLM_WEIGHTLESS_FIRST)
    _, gw = make_route("litellm", path)
    assert gw.read_current().weights == {"cand": 50, "inc": 50}
    assert push_weights(gw, {"inc": 100, "cand": 0}).ok
    assert [d["litellm_params"]["weight"] for d in yaml.safe_load(path.read_text())["model_list"]] == [0, 100]


def test_litellm_refuses_a_deployment_of_the_route_that_is_no_target_and_has_no_weight(tmp_path):
    """Listed first, it switched simple-shuffle to a uniform pick over every deployment, b at weight 0 included,
    while the push reported inc=50, cand=50."""
    path = tmp_path / "config.yaml"
    stranger = "  - model_name: chat\n    litellm_params: {model: openai/some-fallback, api_base: 'http://fb/v1'}\n"
    text = LITELLM_WEIGHTLESS_FIRST.replace("model_list:\n", "model_list:\n" + stranger)
    path.write_text(text)
    _, gw = make_route("litellm", path)
    result = push_weights(gw, {"inc": 50, "cand": 50})
    assert not result.ok and "model_list[0]: a deployment of 'chat' that is not one of its targets has no weight" \
        in result.error
    assert path.read_text() == text


SHADOWING_RULE = """\
name: company-routing
type: gateway-load-balancing-config
rules:
  - id: staging-chat
    when:
      models: [chat]
      metadata: {environment: staging}
    load_balance_targets:
      - target: openai-main/gpt-4o
        weight: 100
  - id: all-chat-models
    when:
      models: [chat, summarise]
    load_balance_targets:
      - target: openai-main/gpt-4o
        weight: 100
"""


def test_truefoundry_puts_a_new_route_rule_before_rules_that_would_shadow_it(tmp_path):
    """TrueFoundry applies the first matching rule; appended after 'all-chat-models', the route's rule never applied
    while the push reported its weights as in force."""
    path = tmp_path / "routing.yaml"
    path.write_text(SHADOWING_RULE)
    _, gw = make_route("truefoundry", path)
    assert push_weights(gw, {"inc": 50, "cand": 50}).ok
    rules = yaml.safe_load(path.read_text())["rules"]
    assert [r["id"] for r in rules] == ["chat", "staging-chat", "all-chat-models"]
    assert rules[2] == yaml.safe_load(SHADOWING_RULE)["rules"][1]


def test_truefoundry_refuses_to_set_weights_on_a_route_rule_an_earlier_rule_shadows(tmp_path):
    path = tmp_path / "routing.yaml"
    text = SHADOWING_RULE + ("  - id: chat\n    when: {models: [chat]}\n    load_balance_targets:\n"
                             "      - target: openai-main/gpt-4o\n        weight: 100\n")
    path.write_text(text)
    _, gw = make_route("truefoundry", path)
    result = push_weights(gw, {"inc": 50, "cand": 50})
    assert not result.ok and "rule 'all-chat-models' comes before rule 'chat'" in result.error
    assert "staging-chat" not in result.error  # a rule for some of the model's requests only is the user's design
    assert path.read_text() == text


def test_a_push_that_writes_nothing_undoes_nothing_when_the_reload_fails(tmp_path):
    """The push before it wrote the file; a failed reload used to 'undo' that earlier push, leaving the file two
    revisions back (a config neither the state nor the running gateway holds)."""
    path = tmp_path / "routing.yaml"
    broken = tmp_path / "reload-broken"
    _, gw = make_route("truefoundry", path, reload_command=["sh", "-c", f"test ! -e {broken}"])
    assert push_weights(gw, {"inc": 100, "cand": 0}).ok
    assert push_weights(gw, {"inc": 95, "cand": 5}).ok
    held, held_prev = path.read_text(), previous_revision_path(path).read_text()
    broken.touch()
    result = push_weights(gw, {"inc": 95, "cand": 5})  # what the file holds already (a reconcile, a retried step)
    assert not result.ok and "reload command exited 1" in result.error
    assert path.read_text() == held and previous_revision_path(path).read_text() == held_prev


TF_SHARED_LIST = """\
name: corp-routing
type: gateway-load-balancing-config
rules:
  - id: chat
    type: weight-based-routing
    when: {models: [chat]}
    load_balance_targets: &pool
      - target: openai-main/gpt-4o
        weight: 100   # the EU rule shares this list
  - id: chat-eu
    type: weight-based-routing
    when: {models: [chat-eu]}
    load_balance_targets: *pool
"""
TF_SHARED_ENTRY = """\
name: corp-routing
type: gateway-load-balancing-config
rules:
  - id: chat
    type: weight-based-routing
    when: {models: [chat]}
    load_balance_targets:
      - &main {target: openai-main/gpt-4o, weight: 100}
  - id: chat-eu
    type: weight-based-routing
    when: {models: [chat-eu]}
    load_balance_targets: [*main]
"""
TF_MERGED = """\
name: corp-routing
type: gateway-load-balancing-config
defaults: &defaults
  type: weight-based-routing
  load_balance_targets:
    - target: openai-main/gpt-4o
      weight: 100
rules:
  - id: chat
    <<: *defaults
    when: {models: [chat]}
  - id: chat-eu
    <<: *defaults
    when: {models: [chat-eu]}
"""
TF_SHARED_VIRTUAL_MODEL = """\
name: team-models
integrations:
  - name: chat
    routing_config: &shared
      type: weight-based-routing
      load_balance_targets:
        - target: openai-main/gpt-4o
          weight: 100
  - name: chat-eu
    routing_config: *shared
"""
TF_ENTRY_MERGED_BY_OTHERS = """\
name: corp-routing
type: gateway-load-balancing-config
rules:
  - id: chat
    type: weight-based-routing
    when: {models: [chat]}
    load_balance_targets:
      - &gpt_entry
        target: openai-main/gpt-4o
        weight: 100
        retry_config: {attempts: 2}
  - id: chat-eu
    type: weight-based-routing
    when: {models: [chat-eu]}
    load_balance_targets:
      - <<: *gpt_entry
        metadata_match: {region: eu}
"""
TF_RULE_MERGED_BY_OTHERS = """\
name: corp-routing
type: gateway-load-balancing-config
rules:
  - &chat_rule
    id: chat
    type: weight-based-routing
    when: {models: [chat]}
    load_balance_targets:
      - target: openai-main/gpt-4o
        weight: 100
  - <<: *chat_rule
    id: chat-eu
    when: {models: [chat-eu]}
"""
TF_VIRTUAL_MODEL_MERGED_BY_OTHERS = """\
name: team-models
integrations:
  - name: chat
    routing_config: &shared
      type: weight-based-routing
      load_balance_targets:
        - target: openai-main/gpt-4o
          weight: 100
  - name: chat-eu
    routing_config:
      <<: *shared
      sticky_routing: {ttl: 60}
"""


@pytest.mark.parametrize("text", [TF_SHARED_LIST, TF_SHARED_ENTRY, TF_MERGED, TF_SHARED_VIRTUAL_MODEL,
                                  TF_ENTRY_MERGED_BY_OTHERS, TF_RULE_MERGED_BY_OTHERS,
                                  TF_VIRTUAL_MODEL_MERGED_BY_OTHERS],
                         ids=["aliased-list", "aliased-entry", "merge-key", "aliased-routing-config",
                              "entry-merged-by-another-rule", "rule-merged-by-another-rule",
                              "routing-config-merged-by-another-model"])
def test_truefoundry_push_leaves_rules_that_share_the_routes_block_through_an_anchor_alone(tmp_path, text):
    path = tmp_path / "routing.yaml"
    path.write_text(text)
    _, gw = make_route("truefoundry", path)
    result = push_weights(gw, {"inc": 60, "cand": 40})
    assert result.ok and result.observed == {"inc": 60, "cand": 40}, result.error
    before, after = yaml.safe_load(text), yaml.safe_load(path.read_text())
    blocks = "rules" if "rules" in before else "integrations"
    others_before = [b for b in before[blocks] if b.get("id", b.get("name")) != "chat"]
    others_after = [b for b in after[blocks] if b.get("id", b.get("name")) != "chat"]
    assert others_after == others_before  # chat-eu still sends everything to gpt-4o
    chat = next(b for b in after[blocks] if b.get("id", b.get("name")) == "chat")
    targets = chat.get("routing_config", chat)["load_balance_targets"]
    assert [(t["target"], t["weight"]) for t in targets] == [("openai-main/gpt-4o", 60), ("azure-eu/gpt-4o-mini", 40)]
    assert get_gateway(gw.route.gateway, gw.route).read_current().weights == {"inc": 60, "cand": 40}


TF_SHARED_DEFAULTS = """\
name: corp-routing
type: gateway-load-balancing-config
x-retry: &retry
  retry_config: {attempts: 3}
rules:
  - id: chat
    type: weight-based-routing
    when: {models: [chat]}
    load_balance_targets:
      - <<: *retry
        target: openai-main/gpt-4o
        weight: 100
  - id: chat-eu
    type: weight-based-routing
    when: {models: [chat-eu]}
    load_balance_targets:
      - <<: *retry
        target: openai-main/gpt-4o
        weight: 100
"""


def test_truefoundry_push_keeps_the_routes_entries_following_the_defaults_they_merge(tmp_path):
    """Nothing of the route's rule is shared: its entry only merges shared defaults, and must go on doing so."""
    path = tmp_path / "routing.yaml"
    path.write_text(TF_SHARED_DEFAULTS)
    _, gw = make_route("truefoundry", path)
    for weights in ({"inc": 60, "cand": 40}, {"inc": 50, "cand": 50}):
        assert push_weights(get_gateway(gw.route.gateway, gw.route), weights).ok
    text = path.read_text()
    assert text.count("<<: *retry") == 2 and text.count("retry_config") == 1, text
    # the team raises the shared retry attempts: both rules follow
    doc = yaml.safe_load(text.replace("retry_config: {attempts: 3}", "retry_config: {attempts: 5}"))
    chat, eu = (rule["load_balance_targets"] for rule in doc["rules"])
    assert chat[0] == {"target": "openai-main/gpt-4o", "weight": 50, "retry_config": {"attempts": 5}}
    assert eu[0] == {"target": "openai-main/gpt-4o", "weight": 100, "retry_config": {"attempts": 5}}


TF_SHARED_SCALAR = """\
name: corp-routing
type: gateway-load-balancing-config
rules:
  - id: chat
    type: weight-based-routing
    when: {models: [chat]}
    load_balance_targets:
      - target: &gpt openai-main/gpt-4o
        weight: 100
  - id: chat-eu
    type: weight-based-routing
    when: {models: [chat-eu]}
    load_balance_targets:
      - target: *gpt
        weight: 100
"""


def test_truefoundry_push_leaves_an_anchor_where_it_was_when_the_push_changes_nothing_it_names(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(TF_SHARED_SCALAR)
    _, gw = make_route("truefoundry", path)
    assert push_weights(gw, {"inc": 60, "cand": 40}).ok
    chat, eu = path.read_text().split("  - id: chat-eu")
    assert "- target: &gpt openai-main/gpt-4o\n        weight: 60\n" in chat and "- target: *gpt\n" in eu, chat + eu
