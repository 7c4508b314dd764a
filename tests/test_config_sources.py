"""A source's mapping is checked when the config loads, against its reader's own presets and keys: a typo is a
config error naming the file and the key (exit 2), not an ingest that fails later (sql) or a key never read (otel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shadowjudge.config import ConfigError, SourceConfig, did_you_mean, load_config, parse_config
from shadowjudge.traffic import TrafficError
from shadowjudge.traffic.sources import otel, sql

REPO = Path(__file__).resolve().parents[1]
ROUTE = {"name": "chat-default", "incumbent": {"name": "inc", "model": "m1", "base_url": "http://127.0.0.1:9/v1"},
         "candidates": [{"name": "cand", "model": "m2", "base_url": "http://127.0.0.1:9/v1"}]}
SQL = {"name": "db", "kind": "sql", "url": "sqlite:///src.db"}


def config_with(*sources: dict, environ: dict[str, str] | None = None):
    return parse_config({"sources": list(sources), "routes": [ROUTE]}, "cfg.yaml", environ or {})


@pytest.mark.parametrize("source, says", [
    ({**SQL, "mapping": "litelm"}, "source 'db': unknown mapping preset 'litelm'; did you mean 'litellm'?"),
    ({**SQL, "mapping": {"preset": "litelm"}}, "unknown mapping preset 'litelm'; did you mean 'litellm'?"),
    ({**SQL, "mapping": {"preset": "litellm", "timestmp": "ts"}},
     "unknown mapping keys ['timestmp']; did you mean 'timestamp'?"),
    ({**SQL, "mapping": {"preset": "litellm", "metdata.team": "team_id", "colour": "c"}},
     "unknown mapping keys ['colour', 'metdata.team']; did you mean 'metadata.team' for 'metdata.team'?"),
    ({**SQL, "table": "calls", "mapping": {"request_id": "id"}},
     "the mapping needs timestamp, messages (or request), model (or route)"),
    ({**SQL, "table": "calls"}, "the mapping needs request_id, timestamp"),
    ({"name": "o", "kind": "otel", "path": "x", "mapping": {"rout": "llm.route"}},
     "mapping keys ['rout'] are not used by otel sources; did you mean 'route'?"),
    ({"name": "o", "kind": "otel", "path": "x", "mapping": "litellm"}, "otel sources have no mapping presets"),
    ({"name": "j", "kind": "jsonl", "path": "x", "mapping": {"route": "r"}}, "jsonl sources"),
])
def test_a_mapping_its_reader_cannot_use_is_a_config_error(source, says):
    with pytest.raises(ConfigError) as err:
        config_with(source)
    message = str(err.value)
    assert message.startswith("cfg.yaml: invalid config") and "  sources: " in message and says in message, message


def test_usable_mappings_load_as_before():
    config = config_with({**SQL, "mapping": "litellm"},
                         {**SQL, "name": "custom", "table": "calls", "mapping": {
                             "request_id": "id", "timestamp": "ts", "messages": "msgs", "route": "model",
                             "metadata.tenant": "tenant"}},
                         {"name": "o", "kind": "otel", "path": "x", "mapping": {"route": "llm.route",
                                                                                 "metadata.team": "team"}},
                         {"name": "j", "kind": "jsonl", "path": "y"})
    assert [s.name for s in config.sources] == ["db", "custom", "o", "j"]


def test_every_bad_source_is_named_and_an_env_override_is_blamed():
    with pytest.raises(ConfigError) as err:
        config_with({**SQL, "mapping": "litellm"}, {**SQL, "name": "second", "mapping": "litellm"},
                    environ={"SHADOWJUDGE__SOURCES__1__MAPPING": "litelm"})
    message = str(err.value)
    assert "source 'second': unknown mapping preset 'litelm'" in message and "source 'db'" not in message
    assert "SHADOWJUDGE__SOURCES__1__MAPPING" in message


def test_the_config_and_the_readers_use_the_readers_lists():
    """One source of truth: a preset or key the reader gains is accepted by the config without editing it."""
    sql.PRESETS["acme"] = {**sql.LITELLM_SPEND_LOGS, "table": "acme_logs"}
    otel.MAPPABLE.add("acme_cost")
    try:
        config_with({**SQL, "mapping": "acme"}, {"name": "o", "kind": "otel", "path": "x",
                                                 "mapping": {"acme_cost": "a"}})
    finally:
        del sql.PRESETS["acme"]
        otel.MAPPABLE.discard("acme_cost")


def test_a_source_built_in_code_is_still_checked_when_its_reader_opens_it():
    with pytest.raises(TrafficError, match="source 's': unknown mapping preset 'litelm'; did you mean 'litellm'"):
        sql.open_source(SourceConfig(name="s", kind="sql", url="sqlite://", mapping="litelm"))


def test_did_you_mean_names_only_near_words():
    assert did_you_mean(["litelm"], ["litellm"]) == "; did you mean 'litellm'?"
    assert did_you_mean(["zzz"], ["litellm"]) == ""
    assert did_you_mean(["a_x", "timestmp"], ["timestamp"]) == "; did you mean 'timestamp' for 'timestmp'?"


def test_the_command_line_exits_2_naming_the_file_before_any_ingest(tmp_path):
    path = tmp_path / "cfg_sqltypo.yaml"
    path.write_text(yaml.safe_dump({"store": {"url": "sqlite:///store.db"}, "mlflow": {"enabled": False},
                                    "sources": [{**SQL, "mapping": {"preset": "litelm"}}], "routes": [ROUTE]}))
    with pytest.raises(ConfigError, match="did you mean 'litellm'"):
        load_config(path, environ={})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWJUDGE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "200"
    for command in (["init"], ["traffic", "ingest"]):
        proc = subprocess.run([sys.executable, "-m", "shadowjudge.cli", *command, "-c", str(path)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert str(path) in proc.stderr and "unknown mapping preset 'litelm'" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store.db").exists()  # refused before the store was made
