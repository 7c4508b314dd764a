"""The checks a cycle runs beside the canary analysis, end to end through the Prefect flow on real parts (the
replay server, SQLite and PostgreSQL, a local MLflow store): the golden regression set gates promotion, drift
is measured and alerted on, the calibration share of judged pairs goes to a teacher over HTTP, and an alert on the
route's deterministic checks shows the answers that failed them.
"""

from __future__ import annotations

import gzip
import json
import random
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from mlflow.tracking import MlflowClient
from sqlalchemy import func, select
from test_alerts_sinks import Receiver, closed_port
from typer.testing import CliRunner

from shadowjudge.analysis.golden import GoldenSetError
from shadowjudge.config import load_config
from shadowjudge.cycle import drift_windows, golden_gate
from shadowjudge.demo import DEMO_DATA, demo_config
from shadowjudge.shadow.replay_server import ReplayServer
from shadowjudge.store import Alert, Judgment, RouteWeightChange, ShadowResult, ShadowRun, get_engine, session_scope
from cycle_configs import write_cycle_config

ROUTE = "chat-default"
FAST = {"seed": 1, "default": {"ttft_ms": 2, "token_ms": 0}}


@pytest.fixture(scope="module")
def replay_server():
    with ReplayServer(DEMO_DATA / "recordings.jsonl.gz", FAST) as server:
        yield server


def _alerts(engine, kind: str) -> list[Alert]:
    with session_scope(engine) as s:
        rows = list(s.scalars(select(Alert).where(Alert.kind == kind).order_by(Alert.id)))
        s.expunge_all()
    return rows


def test_golden_set_blocks_the_candidate_that_fails_it(tmp_path, store_url, replay_server, prefect_harness):
    from flows.cycle import evaluation_cycle

    config_path = write_cycle_config(tmp_path, store_url, replay_server.base_url, drift={"enabled": False})
    outcome = evaluation_cycle(config_path=config_path, cycle_id="g1")["routes"][ROUTE]
    engine = get_engine(store_url)

    # llama-2-7b-chat's recorded answers refuse all three benign requests of the demo's golden set; Yi answers them.
    assert outcome["weights_after"]["llama-2-7b"] == 0
    golden = _alerts(engine, "golden")
    assert [(a.target, a.severity) for a in golden] == [("llama-2-7b", "critical")]
    report = golden[0].bundle["golden"]
    assert report["n_failed"] == 3 and not report["passed"]
    assert all("I apologize, but I cannot" in " ".join(r["failures"]) for r in report["results"])
    with session_scope(engine) as s:
        run = s.scalar(select(ShadowRun))
        assert run.summary["golden_failed"] == ["llama-2-7b"]
        mlflow_run_id = run.mlflow_run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    nested = {r.data.tags.get("shadowjudge.target") or r.info.run_name: r.data.metrics
              for r in client.search_runs([client.get_run(mlflow_run_id).info.experiment_id],
                                          f"tags.mlflow.parentRunId = '{mlflow_run_id}'")}
    golden_metrics = {name: m.get("golden.passed") for name, m in nested.items()}
    assert sorted(golden_metrics.values()) == [0.0, 1.0], golden_metrics

    # A rerun of the cycle asks again but stores nothing twice.
    with session_scope(engine) as s:
        changes = s.scalar(select(func.count()).select_from(RouteWeightChange))
    evaluation_cycle(config_path=config_path, cycle_id="g1")
    assert [a.id for a in _alerts(engine, "golden")] == [golden[0].id]
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(RouteWeightChange)) == changes


def test_golden_gate_leaves_an_unreachable_candidates_cases_unanswered_and_refuses_a_bad_file(tmp_path, sqlite_url):
    data = demo_config(tmp_path, f"http://127.0.0.1:{closed_port()}/v1")
    data["store"]["url"] = sqlite_url
    data["shadow"].update(max_retries=1, retry_backoff_s=0.01, timeout_s=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    reports = golden_gate(config, config.routes[0])
    assert set(reports) == {"yi-34b", "llama-2-7b"}
    for report in reports.values():  # an outage (maybe the evaluator's) is no wrong answer: nothing failed
        assert (report["status"], report["passed"], report["n_failed"], report["n_unanswered"]) == (
            "incomplete", False, 0, 3)
        assert all((r["unanswered"], r["failures"]) == ("connection_error", []) for r in report["results"])

    bad = tmp_path / "golden.yaml"
    bad.write_text("cases:\n  - id: x\n    prompt: hi\n    max_length: -1\n")
    data["routes"][0]["golden_set"] = str(bad)
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    with pytest.raises(GoldenSetError, match=r"golden.yaml: case x: max_length"):
        golden_gate(config, config.routes[0])


def _log_with_timestamps(tmp_path, shift: bool) -> str:
    """The demo log with new request times: with `shift`, the 'selfinstruct' instructions arrive in the last day
    and the other subsets in the day before (a change of topic); without, the same requests in a random order."""
    rows = [json.loads(line) for line in gzip.open(DEMO_DATA / "requests.jsonl.gz", "rt")]
    if shift:
        rows.sort(key=lambda r: r["metadata"]["task"] == "selfinstruct")
        late = sum(r["metadata"]["task"] == "selfinstruct" for r in rows)
    else:
        random.Random(7).shuffle(rows)
        late = len(rows) // 3
    end = datetime(2026, 11, 22, tzinfo=timezone.utc)
    early = len(rows) - late
    for i, row in enumerate(rows):
        if i < early:
            row["timestamp"] = (end - timedelta(hours=48) + timedelta(hours=24) * i / early).isoformat()
        else:
            row["timestamp"] = (end - timedelta(hours=24) + timedelta(hours=24) * (i - early) / late).isoformat()
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("shift", [True, False], ids=["topic-shift", "no-change"])
def test_cycle_checks_input_drift_and_alerts_only_on_a_real_shift(tmp_path, sqlite_url, replay_server,
                                                                  prefect_harness, shift):
    from flows.cycle import evaluation_cycle

    log = _log_with_timestamps(tmp_path, shift)
    config_path = write_cycle_config(tmp_path, sqlite_url, replay_server.base_url,
                                sources=[{"name": "gateway-logs", "kind": "jsonl", "path": log}],
                                drift={"current_window_h": 24, "reference_window_h": 24})
    data = yaml.safe_load(open(config_path))
    data["routes"][0].pop("golden_set")
    open(config_path, "w").write(yaml.safe_dump(data))
    evaluation_cycle(config_path=config_path, cycle_id="d1")
    engine = get_engine(sqlite_url)

    reference, current = drift_windows(engine, ROUTE, 24, 24)
    assert current.end - reference.start == timedelta(hours=48)
    with session_scope(engine) as s:
        run = s.scalar(select(ShadowRun))
        mlflow_run_id = run.mlflow_run_id
    metrics = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(mlflow_run_id).data.metrics
    assert "drift.input.prompt_embeddings.effect" in metrics, sorted(k for k in metrics if k.startswith("drift"))
    input_alerts = [a for a in _alerts(engine, "drift") if a.metric.startswith("input:")]
    if shift:
        assert metrics["drift.input.prompt_embeddings.effect"] >= 0.55
        assert len(input_alerts) == 1 and input_alerts[0].severity == "warning"
        assert input_alerts[0].bundle["drift"]["details"]["examples"], "the alert shows typical new prompts"
        evaluation_cycle(config_path=config_path, cycle_id="d1")  # rerun: the open alert recurs, not duplicates
        assert [a.id for a in _alerts(engine, "drift") if a.metric.startswith("input:")] == [input_alerts[0].id]
    else:
        assert input_alerts == []
        assert metrics["drift.input.prompt_embeddings.effect"] < 0.55


class Teacher:
    """An LLM-as-judge endpoint on loopback whose visible rule is 'the longer answer wins'."""

    def __init__(self) -> None:
        self.calls = 0
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                teacher.calls += 1
                user = body["messages"][-1]["content"]
                if "## Answer A" in user:
                    a, b = user.split("## Answer A", 1)[1].split("## Answer B", 1)
                    content = json.dumps({"winner": "A" if len(a) >= len(b) else "B"})
                else:
                    content = json.dumps({"score": 7})
                reply = json.dumps({"id": "t", "object": "chat.completion", "created": 0, "model": "teacher",
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Teacher:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_cycle_sends_the_calibration_share_to_the_teacher_once(tmp_path, sqlite_url, replay_server, prefect_harness):
    from flows.cycle import evaluation_cycle

    with Teacher() as teacher:
        url = f"http://127.0.0.1:{teacher.server.server_address[1]}/v1"
        config_path = write_cycle_config(
            tmp_path, sqlite_url, replay_server.base_url, drift={"enabled": False},
            judge={"evaluator": "lexical", "calibration_fraction": 0.5,
                   "teacher": {"name": "teacher", "model": "gpt-4-judge", "base_url": url}})
        evaluation_cycle(config_path=config_path, cycle_id="k1")
        engine = get_engine(sqlite_url)
        with session_scope(engine) as s:
            roles = [j.details.get("role") for j in s.scalars(select(Judgment))]
            mlflow_run_id = s.scalar(select(ShadowRun.mlflow_run_id))
        judged = roles.count("teacher")
        assert 20 <= judged <= 60  # about half of the 80 judged pairs, chosen by hash
        calls = teacher.calls
        evaluation_cycle(config_path=config_path, cycle_id="k1")
        with session_scope(engine) as s:
            assert [j.details.get("role") for j in s.scalars(select(Judgment))].count("teacher") == judged
        assert teacher.calls == calls, "a rerun re-asked the teacher"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = client.download_artifacts(mlflow_run_id, "calibration.json", str(tmp_path))
    report = json.load(open(path))
    assert report["judged"] + report["already_judged"] == judged  # the rerun's report: all of them already judged
    assert report["agreement"]["n"] > 0 and 0 <= report["agreement"]["agreement"] <= 1
    metrics = client.get_run(mlflow_run_id).data.metrics  # charted run by run in MLflow
    assert metrics["calibration.agreement"] == pytest.approx(report["agreement"]["agreement"])
    assert metrics["calibration.n"] == report["agreement"]["n"] and metrics["calibration.pairs"] == judged
    assert 0 <= metrics["calibration.teacher_prefers_longer"] <= 1
    assert 0 <= metrics["calibration.student_prefers_longer"] <= 1


def test_one_routes_failure_does_not_stop_the_routes_after_it(tmp_path, sqlite_url, replay_server, prefect_harness,
                                                              monkeypatch):
    """A missing key on the first route used to end the cycle there: later routes were never opened."""
    from flows.cycle import RoutesFailed, evaluation_cycle
    from cycle_configs import cycle_config, save_config

    monkeypatch.delenv("SJ_TEST_UNSET_KEY", raising=False)
    data = cycle_config(tmp_path, sqlite_url, replay_server.base_url, drift={"enabled": False})
    broken = data["routes"][0]
    other = yaml.safe_load(yaml.safe_dump(broken))
    broken["candidates"][0]["api_key_env"] = "SJ_TEST_UNSET_KEY"
    other["name"] = "chat-other"
    other.pop("golden_set", None)
    other["gateway"] = {"kind": "truefoundry", "path": str(tmp_path / "other-gateway.yaml")}
    data["routes"].append(other)
    with pytest.raises(RoutesFailed) as exc:
        evaluation_cycle(config_path=str(save_config(tmp_path, data)), cycle_id="r1")
    assert "route chat-default:" in str(exc.value) and "SJ_TEST_UNSET_KEY" in str(exc.value)
    assert "chat-other completed" in str(exc.value)
    with session_scope(get_engine(sqlite_url)) as s:
        runs = {r.route: r.status for r in s.scalars(select(ShadowRun))}
    assert runs["chat-other"] == "finished"


def test_a_cycle_whose_judge_is_missing_fails_before_any_shadow_call(tmp_path, sqlite_url, replay_server,
                                                                   prefect_harness):
    """No champion in the registry: the score stage used to find out after every shadow request was paid for,
    and the run stayed open, so the next cycle picked and replayed the same samples again."""
    from evaluators.judge_registry import JudgeRegistryError
    from flows.cycle import evaluation_cycle
    from cycle_configs import cycle_config, save_config

    data = cycle_config(tmp_path, sqlite_url, replay_server.base_url, drift={"enabled": False})
    data["judge"] = {"evaluator": "small-judge", "registered_name": "never-trained"}
    def answered() -> int:
        return sum(m["requests"] for m in replay_server.stats()["models"].values())

    before = answered()
    with pytest.raises(JudgeRegistryError, match="no judge registered as 'never-trained'"):
        evaluation_cycle(config_path=str(save_config(tmp_path, data)), cycle_id="j1")
    with session_scope(get_engine(sqlite_url)) as s:
        assert s.scalar(select(func.count()).select_from(ShadowRun)) == 0
    assert answered() == before


def _is_json_answer(text: str | None) -> bool:
    try:
        return isinstance(json.loads(text or ""), dict)
    except ValueError:
        return False


def test_a_checks_alert_shows_the_answers_that_broke_the_json_check(tmp_path, sqlite_url, prefect_harness):
    """A route whose answers are JSON ({"answer": ...}): llama-2-7b drops the JSON on about 40% of the prompts.
    Its `checks` alert carries exactly those answers as examples, each naming the check it failed (the incumbent
    failing none), and both `alerts show` and the Slack message say so."""
    from flows.cycle import evaluation_cycle
    from shadowjudge.alerts.cli import alerts_cli
    from cycle_configs import cycle_config, save_config

    def breaks(prompt_id: str) -> bool:
        return int(prompt_id, 16) % 5 in (0, 1)

    recordings = tmp_path / "recordings.jsonl"
    with gzip.open(DEMO_DATA / "recordings.jsonl.gz", "rt") as fh, recordings.open("w") as out:
        for row in map(json.loads, fh):
            if not (row["model"] == "llama-2-7b-chat-hf" and breaks(row["prompt_id"])):
                row["output"] = json.dumps({"answer": row["output"]})
            out.write(json.dumps(row) + "\n")
    with ReplayServer(recordings, FAST) as server, Receiver(default=200) as slack:
        data = cycle_config(tmp_path, sqlite_url, server.base_url, drift={"enabled": False},
                            alerts={"sinks": [{"name": "slack", "kind": "slack", "url": slack.url, "backoff_s": 0}]})
        data["routes"][0].pop("golden_set")
        data["routes"][0]["checks"] = [{"kind": "json", "schema": {"type": "object", "required": ["answer"]}}]
        config_path = str(save_config(tmp_path, data))
        evaluation_cycle(config_path=config_path, cycle_id="j1")

    engine = get_engine(sqlite_url)
    with session_scope(engine) as s:
        alerts = s.scalars(select(Alert).where(Alert.metric == "checks")).all()
        assert [(a.target, a.slice, a.severity) for a in alerts] == [("llama-2-7b", None, "critical")]
        alert = alerts[0]
        answers = {(r.sample_id, r.target): r.output_text for r in s.scalars(
            select(ShadowResult).where(ShadowResult.run_id == alert.run_id, ShadowResult.attempt == 0))}
    broken = sorted(sid for (sid, target), text in answers.items()
                    if target == "llama-2-7b" and text is not None and not _is_json_answer(text))
    assert len(broken) >= 8
    assert all(_is_json_answer(text) for (_, target), text in answers.items() if target != "llama-2-7b")
    examples = alert.bundle["examples"]
    assert [e["sample_id"] for e in examples] == broken[:5]  # alerts.max_examples
    assert all(e["candidate_failed_checks"] == ["json"] and e["incumbent_failed_checks"] == [] for e in examples)
    assert all(e["candidate_answer"].startswith(answers[e["sample_id"], "llama-2-7b"][:100]) for e in examples)

    shown = CliRunner(env={"COLUMNS": "200"}).invoke(alerts_cli, ["show", str(alert.id), "--config", config_path])
    assert shown.exit_code == 0, shown.output
    assert shown.output.count("checks failed: candidate json, incumbent none") == len(examples)
    posted = [r["json"] for r in slack.requests if "checks" in r["json"]["text"]]
    assert len(posted) == 1
    texts = [b["text"]["text"] for b in posted[0]["blocks"] if b["type"] == "section" and "text" in b]
    assert sum("*Checks failed*: candidate json, incumbent none" in t for t in texts) == 2
