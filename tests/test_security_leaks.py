"""Secrets and PII seeded everywhere a user puts them never come out anywhere the system writes.

Seeded: the targets' API key (an env var; the replay server requires it), a second key that the server refuses and
echoes back in its 401 body, webhook URLs with tokens in their path (one delivering, one dead), the store password
(PostgreSQL), and in the traffic log API keys, bearer tokens, AWS keys and a JWT, e-mails, phones, card numbers and
IBANs, in prompts, system prompts, logged answers, request parameters and metadata. One real cycle runs through the
Prefect flow with alerts on (the refused candidate fails, so alerts fire). Then every table row, every MLflow param,
tag, metric key and artifact file, every log record (ours, the libraries', and those the Prefect API stored), every
alert stored and delivered, and the Prefect artifact are searched for each raw value.
"""

from __future__ import annotations

import gzip
import json
import logging
import secrets
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from sqlalchemy import func, select, text
from sqlalchemy import inspect as sa_inspect
from test_alerts_sinks import Receiver
from test_reliability_faults import ROUTE, closed_port, write_config

from shadowjudge.demo import DEMO_DATA
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import Alert, ShadowResult, get_engine, session_scope

SAMPLES = 40


def _seeded_values() -> dict[str, str]:
    token = secrets.token_hex(12)
    return {
        "target key": f"sk-proj-{token}TargetKey0123456789",
        "refused key": f"sk-proj-{secrets.token_hex(12)}RefusedKey98765",
        "webhook token": f"T0SECRET{secrets.token_hex(8)}",
        "dead webhook token": f"T1SECRET{secrets.token_hex(8)}",
        "store password": f"pw{secrets.token_hex(8)}",
        "logged OpenAI key": f"sk-proj-{secrets.token_hex(16)}",
        "logged Stripe key": f"sk_live_{secrets.token_hex(12)}",
        "logged bearer token": f"tok{secrets.token_hex(16)}",
        "logged AWS key id": "AKIA" + secrets.token_hex(8).upper(),
        "logged JWT": f"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ{secrets.token_hex(6)}.{secrets.token_hex(16)}",
        "logged GitHub token": "ghp_" + secrets.token_hex(18),
        "email": f"jane.doe.{secrets.token_hex(3)}@acme-corp.com",
        "metadata email": f"ops-{secrets.token_hex(3)}@example.org",
        "phone": "+44 20 7946 0958",
        "card": "4111 1111 1111 1111",
        "IBAN": "GB82 WEST 1234 5698 7654 32",
    }


def _seed_traffic(values: dict[str, str], path: Path) -> None:
    """The first SAMPLES demo records, each carrying some of the seeded values in every field that holds text."""
    with gzip.open(DEMO_DATA / "requests.jsonl.gz", "rt") as src:
        records = [json.loads(line) for line in src.readlines()[:SAMPLES]]
    carriers = [
        f"My OpenAI key is {values['logged OpenAI key']} and Stripe {values['logged Stripe key']}.",
        f"Header was 'Authorization: Bearer {values['logged bearer token']}'; AWS id {values['logged AWS key id']}.",
        f"Session {values['logged JWT']} and token {values['logged GitHub token']}.",
        f"Mail {values['email']} or call {values['phone']}; card {values['card']}, IBAN {values['IBAN']}.",
    ]
    for i, record in enumerate(records):
        carrier = carriers[i % len(carriers)]
        messages = record["request"]["messages"]
        messages[0]["content"] += " " + carrier  # the system prompt
        if i % 2:
            messages[-1]["content"] = carrier + " " + messages[-1]["content"]
        record["request"]["user"] = values["email"]
        record["request"]["api_key"] = values["logged OpenAI key"]
        record["response"]["choices"][0]["message"]["content"] += f"\n\nContact: {values['email']}, {values['phone']}."
        record["metadata"].update(user_email=values["metadata email"], note=carriers[(i + 1) % len(carriers)],
                                  authorization=f"Bearer {values['logged bearer token']}")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _store_dump(url: str) -> str:
    """Every row of every table, as text."""
    engine = get_engine(url)
    out = []
    with engine.connect() as conn:
        for table in sa_inspect(engine).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                out.append(f"{table}: " + json.dumps([str(v) for v in row]))
    return "\n".join(out)


def _mlflow_dump(tracking_uri: str, download_to: Path) -> str:
    """Params, tags and metric names of every run, and the text of every artifact file."""
    client = MlflowClient(tracking_uri)
    out, files = [], set()
    experiments = client.search_experiments()
    for run in client.search_runs([e.experiment_id for e in experiments]):
        out.append(json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": list(run.data.metrics)}))
        local = Path(client.download_artifacts(run.info.run_id, "", str(download_to / run.info.run_id)))
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            files.add(file.name)
            out.append(file.read_bytes().decode("utf-8", errors="replace"))
    assert {"samples.json", "analysis.json", "shadow_report.json"} <= files, files
    return "\n".join(out)


def _prefect_dump(flow_run_id) -> str:
    """What the Prefect API holds for the flow run: parameters, logs (as the UI shows them) and artifacts."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    out = []
    with get_client(sync_client=True) as client:
        out.append(json.dumps(client.read_flow_run(flow_run_id).parameters))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
        out += [log.message for log in logs]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        out += [str(a.data) for a in artifacts]
    assert logs and any("Decision" in str(a.data) for a in artifacts), "the flow run's logs and artifact are missing"
    return "\n".join(out)


def _leaks(values: dict[str, str], places: dict[str, str]) -> list[str]:
    found = []
    for place, haystack in places.items():
        squeezed = haystack.replace(" ", "")
        for name, value in values.items():
            if value in haystack:
                at = haystack.index(value)
                found.append(f"{name} in {place}: ...{haystack[max(0, at - 160):at + 40]!r}")
            elif value.replace(" ", "") in squeezed:
                found.append(f"{name} in {place} (spaces removed)")
    return found


@pytest.mark.slow
def test_no_secret_or_pii_reaches_the_store_mlflow_logs_alerts_or_prefect(
        tmp_path, store_url, prefect_harness, monkeypatch, caplog, capfd):
    from flows.cycle import evaluation_cycle

    monkeypatch.chdir(tmp_path)
    values = _seeded_values()
    if store_url.startswith("postgresql"):  # trust authentication ignores the password, but it is in the URL
        store_url = store_url.replace("postgres@", f"postgres:{values['store password']}@", 1)
    log = tmp_path / "requests.jsonl"
    _seed_traffic(values, log)
    monkeypatch.setenv("SJ_SEC_TARGET_KEY", values["target key"])
    monkeypatch.setenv("SJ_SEC_REFUSED_KEY", values["refused key"])
    caplog.set_level(logging.DEBUG)

    with Receiver(default=200) as hook, ReplayServer(DEMO_DATA / "recordings.jsonl.gz",
                                                     {"seed": 1, "default": {"ttft_ms": 1}},
                                                     api_key=values["target key"]) as server:
        monkeypatch.setenv("SJ_SEC_HOOK_URL", f"{hook.url}/hooks/{values['webhook token']}")
        monkeypatch.setenv("SJ_SEC_DEAD_HOOK_URL", f"http://127.0.0.1:{closed_port()}/h/{values['dead webhook token']}")
        mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        path = write_config(tmp_path, store_url, server.base_url, max_samples=SAMPLES, mlflow_uri=mlflow_uri,
                            log_path=log, alerts={"sinks": [
                                {"name": "hook", "kind": "webhook", "url_env": "SJ_SEC_HOOK_URL",
                                 "min_severity": "info"},
                                {"name": "dead", "kind": "webhook", "url_env": "SJ_SEC_DEAD_HOOK_URL",
                                 "min_severity": "info", "max_attempts": 1, "backoff_s": 0, "timeout_s": 2}]})
        data = yaml.safe_load(path.read_text())
        route = data["routes"][0]
        for target in [route["incumbent"], *route["candidates"]]:
            target["api_key_env"] = "SJ_SEC_TARGET_KEY"
        route["candidates"][1]["api_key_env"] = "SJ_SEC_REFUSED_KEY"
        path.write_text(yaml.safe_dump(data, sort_keys=False))

        state = evaluation_cycle(config_path=str(path), cycle_id="sec", return_state=True)
        outcome = state.result()["routes"][ROUTE]
        delivered = json.dumps([r["json"] for r in hook.requests])

    # The cycle really exercised the paths that could leak: refusals, alerts, both sinks, MLflow, redaction.
    assert outcome["alerts"] >= 1 and hook.requests, "no alert was delivered"
    with session_scope(get_engine(store_url)) as s:
        deliveries = [a.delivered for a in s.scalars(select(Alert))]
        refused = s.scalar(select(func.count()).select_from(ShadowResult)
                           .where(ShadowResult.error_class == "auth_error"))
    assert refused == SAMPLES
    assert all(d["hook"]["status"] == "sent" and d["dead"]["status"] == "failed" for d in deliveries), deliveries
    store = _store_dump(store_url)
    for placeholder in ("[EMAIL]", "[PHONE]", "[API_KEY]", "[BEARER_TOKEN]", "[CARD_NUMBER]", "[IBAN]", "[SECRET]"):
        assert placeholder in store
    places = {
        "the store": store,
        "MLflow": _mlflow_dump(mlflow_uri, tmp_path / "artifacts"),
        "delivered alerts": delivered,
        "Prefect (parameters, logs, artifacts)": _prefect_dump(state.state_details.flow_run_id),
        "log records": "\n".join(r.getMessage() + " " + str(r.args) for r in caplog.records),
        "captured output": "".join(capfd.readouterr()),
    }
    assert _leaks(values, places) == []


def test_http_client_logs_keep_only_scheme_host_and_port(caplog):
    import httpx

    from shadowjudge.environment import apply_defaults

    apply_defaults()
    apply_defaults()  # idempotent: one filter, not two
    assert len([f for f in logging.getLogger("httpx").filters if type(f).__name__ == "UrlPathRedactor"]) == 1
    caplog.set_level(logging.INFO)
    logging.getLogger("httpx").info('HTTP Request: %s %s "%s %d %s"', "POST",
                                    httpx.URL("https://user:pw@hooks.example.com:8443/services/T0/B0/XYZsecret?k=v"),
                                    "HTTP/1.1", 200, "OK")
    logging.getLogger("httpx").info("plain http://10.0.0.1/route-key/abc message")
    text = caplog.text
    assert "https://hooks.example.com:8443/..." in text and '"HTTP/1.1 200 OK"' in text
    assert "http://10.0.0.1/... message" in text
    assert not any(s in text for s in ("XYZsecret", "k=v", "pw@", "route-key"))
