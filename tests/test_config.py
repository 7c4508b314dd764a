import pytest
import yaml

from shadowjudge.config import ConfigError, incumbent_served, load_config, parse_config

EXAMPLE = "configs/shadowjudge.yaml"


def _example() -> dict:
    with open(EXAMPLE) as fh:
        return yaml.safe_load(fh)


def test_worked_example_loads_and_resolves_paths():
    config = load_config(EXAMPLE)
    assert config.routes[0].name == "chat-default"
    assert config.sources[0].path.endswith("shadowjudge/demo_data/requests.jsonl.gz")
    assert config.store.url.startswith("sqlite:////")


def test_fingerprint_changes_with_the_config():
    a = parse_config(_example(), environ={})
    data = _example()
    data["sampling"]["rate"] = 0.25
    assert parse_config(data, environ={}).fingerprint() != a.fingerprint()
    assert parse_config(_example(), environ={}).fingerprint() == a.fingerprint()


@pytest.mark.parametrize("mutate, key, words", [
    (lambda d: d["sampling"].__setitem__("rate", 1.5), "sampling.rate", "less than or equal to 1"),
    (lambda d: d["routes"][0]["incumbent"].pop("base_url"), "routes[0].incumbent.base_url", "Field required"),
    (lambda d: d["routes"][0]["policy"].__setitem__("steps", [50, 5]), "routes[0].policy.steps", "strictly increasing"),
    (lambda d: d["store"].__setitem__("uri", "x"), "store.uri", "Extra inputs are not permitted"),
    (lambda d: d["redaction"]["extra_patterns"].__setitem__("bad", "("), "redaction.extra_patterns", "not a valid regex"),
    (lambda d: d.__setitem__("routes", []), "routes", "at least 1"),
    # accepted before, each failing later: after the shadow test was paid for, or on every cycle
    (lambda d: d["judge"].__setitem__("evaluator", "smal-judge"), "judge.evaluator", "'small-judge', 'llm-judge'"),
    (lambda d: d["routes"][0].__setitem__("name", "bob's-route"), "routes[0].name", "without quotes"),
    (lambda d: d["routes"][0]["candidates"][0].__setitem__("name", "a/b"), "routes[0].candidates[0].name",
     "without quotes, slashes"),
    (lambda d: d["routes"][0].__setitem__("name", ""), "routes[0].name", "1-128 characters"),
    (lambda d: d["routes"][0]["candidates"][0].__setitem__("name", "__cycle__"), "routes[0]", "reserved"),
    (lambda d: d["routes"][0].__setitem__("criteria", {"weights": {"quality": 0}}), "routes[0].criteria",
     "must not all be 0"),
    (lambda d: d["sampling"].__setitem__("metadata_equals", {"tier": [1, 2]}), "sampling.metadata_equals.tier",
     "must be text, a number, true/false or null, not list"),
    (lambda d: d["sources"][0].__setitem__("mapping", {"route": "r"}), "sources", "take no 'mapping'"),
])
def test_bad_config_names_file_key_and_problem(tmp_path, mutate, key, words):
    data = _example()
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    message = str(exc.value)
    assert str(path) in message and key in message and words in message


def test_env_overrides_reach_nested_keys_and_list_items():
    env = {"SHADOWJUDGE__STORE__URL": "postgresql://db/x",
           "SHADOWJUDGE__ROUTES__0__INCUMBENT__BASE_URL": "http://other:1/v1",
           "SHADOWJUDGE__SAMPLING__RATE": "0.2"}
    config = parse_config(_example(), environ=env)
    assert config.store.url == "postgresql://db/x"
    assert config.routes[0].incumbent.base_url == "http://other:1/v1"
    assert config.sampling.rate == 0.2


def test_env_text_is_kept_as_written_where_the_field_takes_text_or_another_scalar():
    """YAML read '0123' as the octal 83 and 'true' as a boolean; a metadata value takes both text and scalars."""
    data = _example()
    data["sampling"]["metadata_equals"] = {"zip": "x", "premium": "x", "tier": 1}
    env = {"SHADOWJUDGE__SAMPLING__METADATA_EQUALS__ZIP": "0123", "SHADOWJUDGE__SAMPLING__METADATA_EQUALS__PREMIUM":
           "true", "SHADOWJUDGE__SAMPLING__METADATA_EQUALS__TIER": "2 # gold", "SHADOWJUDGE__SAMPLING__RATE": "0.5"}
    config = parse_config(data, environ=env)
    assert config.sampling.metadata_equals == {"zip": "0123", "premium": "true", "tier": "2 # gold"}
    assert config.sampling.rate == 0.5  # a number field still reads YAML


def test_env_override_with_a_bad_index_is_a_config_error():
    with pytest.raises(ConfigError, match="ROUTES__7"):
        parse_config(_example(), environ={"SHADOWJUDGE__ROUTES__7__NAME": "x"})


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def test_api_key_comes_from_env_and_a_missing_one_is_named(monkeypatch):
    config = parse_config(_example(), environ={})
    target = config.routes[0].candidates[0]
    monkeypatch.delenv("CANDIDATE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="CANDIDATE_API_KEY"):
        target.api_key()
    monkeypatch.setenv("CANDIDATE_API_KEY", "sk-test")
    assert target.api_key() == "sk-test"


def test_a_secret_put_where_an_env_var_name_belongs_is_refused_without_being_repeated(tmp_path):
    """`api_key_env: sk-...` used to load, then fail every cycle with 'env var sk-... is not set', in the CLI and in
    Prefect's logs."""
    data = _example()
    data["routes"][0]["candidates"][0]["api_key_env"] = "sk-proj-SECRET123"
    sink = {"name": "s", "kind": "slack", "url_env": "https://hooks.slack.com/services/T0/B0/XYZ"}
    data["alerts"] = {"sinks": [sink]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    message = str(exc.value)
    assert "routes[0].candidates[0].api_key_env" in message and "alerts.sinks[0].url_env" in message
    assert "NAME of an environment variable" in message
    assert "SECRET123" not in message and "XYZ" not in message


def test_env_override_of_a_text_field_keeps_the_value_as_written():
    """Values went through YAML: ' #...' was cut as a comment, a number was refused for a text field and '@...'
    crashed the command with a ScannerError."""
    env = {"SHADOWJUDGE__MLFLOW__EXPERIMENT_PREFIX": "team-a #prod", "SHADOWJUDGE__SAMPLING__SEED": "20240501",
           "SHADOWJUDGE__ROUTES__0__CANDIDATES__0__MODEL": "@cf/meta/llama-3-8b",
           "SHADOWJUDGE__SHADOW__MAX_TOKENS": "256", "SHADOWJUDGE__MLFLOW__ENABLED": "false"}
    config = parse_config(_example(), environ=env)
    assert config.mlflow.experiment_prefix == "team-a #prod"
    assert config.sampling.seed == "20240501"
    assert config.routes[0].candidates[0].model == "@cf/meta/llama-3-8b"
    assert config.shadow.max_tokens == 256 and config.mlflow.enabled is False  # other fields still read YAML


def test_env_override_matches_an_existing_key_whatever_its_case():
    """'PRICING__Yi-34B-Chat__...' created a price 'yi-34b-chat' that no model uses; the real one stayed."""
    env = {"SHADOWJUDGE__PRICING__YI-34B-CHAT__INPUT_PER_MTOK": "9",
           "SHADOWJUDGE__PRICING__New-Model__INPUT_PER_MTOK": "1",
           "SHADOWJUDGE__PRICING__New-Model__OUTPUT_PER_MTOK": "2"}
    pricing = parse_config(_example(), environ=env).pricing
    assert pricing["Yi-34B-Chat"].input_per_mtok == 9 and "yi-34b-chat" not in pricing
    assert pricing["New-Model"].output_per_mtok == 2  # a new entry keeps the case it was written in


def test_an_invalid_env_override_is_blamed_on_the_variable():
    env = {"SHADOWJUDGE__SAMPLING__RATE": "@lots"}
    with pytest.raises(ConfigError) as exc:
        parse_config(_example(), "shadowjudge.yaml", environ=env)
    assert "sampling.rate" in str(exc.value) and "(from env SHADOWJUDGE__SAMPLING__RATE)" in str(exc.value)



def test_a_route_level_error_names_the_env_variables_set_inside_the_route():
    """A route's checks are validated as a whole, so the error sits at routes[0]; the override that broke them sits
    deeper, at routes[0].checks[0].max_chars, and the message named only the file."""
    data = _example()
    data["routes"][0]["checks"] = [{"kind": "length", "max_chars": 100}]
    env = {"SHADOWJUDGE__ROUTES__0__CHECKS__0__MAX_CHARS": "-5", "SHADOWJUDGE__SAMPLING__RATE": "0.5"}
    with pytest.raises(ConfigError) as exc:
        parse_config(data, "shadowjudge.yaml", environ=env)
    message = str(exc.value)
    assert "max_chars must be a whole number >= 0, got -5" in message
    assert "(env sets SHADOWJUDGE__ROUTES__0__CHECKS__0__MAX_CHARS inside it)" in message
    assert "SAMPLING__RATE" not in message  # a variable set elsewhere is not blamed
    data["routes"][0]["checks"] = [{"kind": "length", "max_chars": -5}]
    with pytest.raises(ConfigError) as exc:
        parse_config(data, "shadowjudge.yaml", environ={})
    assert "env" not in str(exc.value)


def test_an_error_about_the_whole_config_blames_no_variable_set_somewhere_in_it():
    data = _example()
    data["routes"].append(data["routes"][0])
    env = {"SHADOWJUDGE__STORE__URL": "sqlite:///elsewhere.db", "SHADOWJUDGE__SHADOW__MAX_SAMPLES": "50"}
    with pytest.raises(ConfigError) as exc:
        parse_config(data, "shadowjudge.yaml", environ=env)
    assert "names must be unique" in str(exc.value) and "env" not in str(exc.value)

def test_cycle_endpoints_and_their_keys(monkeypatch):
    """`run` and the flow check every key before ingest: a missing one used to fail the shadow test, retried twice."""
    from shadowjudge.config import check_api_keys

    config = parse_config(_example(), environ={})
    endpoints = config.endpoints(config.routes)
    assert [t.name for t in endpoints] == ["claude-instant", "yi-34b", "llama-2-7b", "gpt-4-teacher"]
    monkeypatch.setenv("INCUMBENT_API_KEY", "k")
    monkeypatch.delenv("CANDIDATE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="CANDIDATE_API_KEY is not set") as exc:
        check_api_keys(endpoints[:3] * 2)  # a target of two routes is named once
    assert "INCUMBENT_API_KEY" not in str(exc.value) and str(exc.value).count("yi-34b") == 1
    no_teacher = parse_config(_example(), environ={"SHADOWJUDGE__JUDGE__CALIBRATION_FRACTION": "0"})
    assert "gpt-4-teacher" not in [t.name for t in no_teacher.endpoints(no_teacher.routes)]


@pytest.mark.parametrize("logged_as, words", [
    ("Yi-34B-Chat-0205", "valid list"),
    ([""], "must name a model"),
    (["01-ai/"], "must name a model"),
    ([" "], "must name a model"),
    ([34], "valid string"),
])
def test_logged_as_is_a_list_of_model_names(tmp_path, logged_as, words):
    data = _example()
    data["routes"][0]["candidates"][0]["logged_as"] = logged_as
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    assert "routes[0].candidates[0].logged_as" in str(exc.value) and words in str(exc.value)


def test_a_candidates_logged_names_are_its_model_name_and_logged_as_but_never_the_incumbents():
    data = _example()
    candidates = data["routes"][0]["candidates"]
    candidates[0]["logged_as"] = ["01-ai/Yi-34B-Chat-0205", "claude-instant-1.2"]
    route = parse_config(data, environ={}).routes[0]
    logged = ["Yi-34B-Chat", "01-ai/yi-34b-chat-0205", "openai/llama-2-7b", "Llama-2-7b-chat-hf", "claude-instant-1.2",
              "anthropic/claude-instant-1.2", "gpt-4"]
    assert [route.served_by_candidate(m) for m in logged] == [True, True, True, True, False, False, False]
    assert parse_config(data, environ={"SHADOWJUDGE__ROUTES__0__CANDIDATES__1__LOGGED_AS": "[llama-2-7b-0613]"}
                        ).routes[0].candidates[1].logged_as == ["llama-2-7b-0613"]


@pytest.mark.parametrize("checks, words", [
    ([{"kind": "xml"}], "kind must be one of"),
    ([{"kind": "regex", "pattern": "(unclosed", "name": "answer_id"}], "check 'answer_id': invalid regex"),
    ([{"kind": "json", "schema": {"type": "objekt"}}], "check 'json': invalid JSON schema"),
    ([{"kind": "length", "max_chars": 10, "max_char": 5}],
     "check #0 (length): unknown field max_char (this kind takes: kind, min_chars,"),
    ([{"kind": "regex", "must_match": False}], "check #0 (regex): missing pattern (required for this kind)"),
    ([{"kind": "json"}, {"kind": "json", "schema": {"type": "object"}}], "['json'] named more than once"),
    ([{"kind": "regex", "pattern": "a", "name": "x"}, {"kind": "length", "max_chars": 9, "name": "x"}],
     "['x'] named more than once"),
])
def test_a_bad_check_is_a_config_error_naming_the_route_and_the_check(tmp_path, checks, words):
    data = _example()
    data["routes"][0]["checks"] = checks
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    message = str(exc.value)
    assert str(path) in message and "routes[0]" in message and "route 'chat-default'" in message
    assert words in message


def test_a_route_with_checks_scores_them_critically_unless_its_criteria_say_otherwise():
    data = _example()
    plain = parse_config(_example(), environ={}).routes[0]
    data["routes"][0]["checks"] = [{"kind": "json", "schema": {"type": "object"}}, {"kind": "refusal"}]
    route = parse_config(data, environ={}).routes[0]
    assert [c.name for c in route.build_checks()] == ["json", "no_refusal"]
    assert route.criteria.weights == {**plain.criteria.weights, "checks": 20}
    assert route.criteria.critical == ["quality", "error_rate", "checks"]
    assert route.criteria.max_check_failure_delta == 0.0
    assert "checks" in route.canary_metrics and "checks" not in plain.canary_metrics
    # A route without checks keeps today's criteria exactly.
    assert plain.checks == []
    assert "checks" not in plain.criteria.weights and "checks" not in plain.criteria.critical

    # Overrides as for any metric: a weight named is kept (0: measured, not scored); a critical list is as written.
    data["routes"][0]["criteria"] = {"weights": {"quality": 40, "checks": 0}, "critical": ["quality"],
                                     "max_check_failure_delta": 0.02}
    route = parse_config(data, environ={}).routes[0]
    assert route.criteria.weights == {"quality": 40, "checks": 0}
    assert route.criteria.critical == ["quality"] and route.criteria.max_check_failure_delta == 0.02


def test_checks_as_a_critical_metric_needs_checks_on_the_route(tmp_path):
    data = _example()
    data["routes"][0]["criteria"]["critical"] = ["quality", "checks"]
    with pytest.raises(ConfigError, match=r"routes\[0\].*names 'checks' but the route declares no checks"):
        parse_config(data, environ={})
    data["routes"][0]["criteria"]["max_check_failure_delta"] = -0.1
    with pytest.raises(ConfigError, match="max_check_failure_delta"):
        parse_config(data, environ={})


def test_a_criteria_object_shared_with_a_route_without_checks_is_not_changed_under_it():
    from shadowjudge.config import CriteriaConfig, RouteConfig

    shared = CriteriaConfig()
    target = dict(name="a", model="m", base_url="http://127.0.0.1:9/v1")
    with_checks = RouteConfig(name="r1", incumbent=target, candidates=[{**target, "name": "b"}], criteria=shared,
                              checks=[{"kind": "refusal"}])
    without = RouteConfig(name="r2", incumbent=target, candidates=[{**target, "name": "b"}], criteria=shared)
    assert "checks" in with_checks.criteria.critical and "checks" in with_checks.criteria.weights
    assert "checks" not in without.criteria.critical and "checks" not in without.criteria.weights


def test_a_fine_tune_named_like_its_base_model_under_another_organisation_is_another_model():
    """Matching on the part after the last '/' took 'acme/Llama-3.1-8B-Instruct' (a candidate fine-tune) for
    'meta-llama/Llama-3.1-8B-Instruct' (the incumbent): none of its logged answers were passed over."""
    data = _example()
    route_data = data["routes"][0]
    route_data["incumbent"]["model"] = "meta-llama/Llama-3.1-8B-Instruct"
    route_data["candidates"] = [{**route_data["candidates"][0], "name": "acme-ft",
                                 "model": "acme/Llama-3.1-8B-Instruct"}]
    route = parse_config(data, environ={}).routes[0]
    assert incumbent_served(route, [(1, "meta-llama/Llama-3.1-8B-Instruct"), (2, "acme/Llama-3.1-8B-Instruct"),
                                    (3, "Llama-3.1-8B-Instruct"), (4, "together/acme/Llama-3.1-8B-Instruct")]) == [1, 3]
