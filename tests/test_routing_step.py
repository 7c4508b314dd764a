"""step_route against a real store (SQLite and PostgreSQL) and a real gateway file, stepped cycle by cycle."""

import json
import math
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from shadowjudge.config import load_config
from shadowjudge.gateways import get_gateway
from shadowjudge.gateways.truefoundry import TrueFoundryGateway
from shadowjudge.routing import CandidateVerdict, load_rollout_state, manual_rollback, route_history, step_route
from shadowjudge.routing.cli import routes_cli
from shadowjudge.store import ShadowRun, get_engine, session_scope

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=timezone.utc)
runner = CliRunner()


def write_config(tmp_path: Path, store_url: str, policy: dict | None = None, gateway: dict | None = None) -> Path:
    doc = {
        "store": {"url": store_url},
        "sources": [{"name": "logs", "path": "requests.jsonl"}],
        "routes": [{
            "name": "chat",
            "incumbent": {"name": "inc", "model": "acct/m-inc", "base_url": "http://127.0.0.1:9000/v1"},
            "candidates": [
                {"name": "fragile", "model": "acct/m-fragile", "base_url": "http://127.0.0.1:9001/v1"},
                {"name": "better", "model": "acct/m-better", "base_url": "http://127.0.0.1:9002/v1"},
            ],
            "policy": policy or {"steps": [1, 5, 25, 50, 100], "min_dwell_s": 1800, "min_samples_per_step": 100},
            "gateway": gateway or {"kind": "truefoundry", "path": str(tmp_path / "gateway" / "routing.yaml")},
        }],
    }
    path = tmp_path / "shadowjudge.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def make_run(engine, key: str) -> int:
    """A shadow run row: the history's run_id refers to one."""
    with session_scope(engine) as s:
        run = ShadowRun(run_key=key, route="chat", config_hash="test")
        s.add(run)
        s.flush()
        return run.id


def simulated_verdict(target: str, p_true: float, n: int, rng: np.random.Generator) -> CandidateVerdict:
    """A stand-in for the analysis: judge preferences ~ Bernoulli(p_true); pass if the 95% interval clears 0.45."""
    prefs = rng.random(n) < p_true
    mean = float(prefs.mean())
    half = 1.96 * math.sqrt(max(mean * (1 - mean), 1e-9) / n)
    verdict = "pass" if mean - half > 0.45 else ("fail" if mean + half < 0.45 else "inconclusive")
    return CandidateVerdict(target, verdict, score=mean, n=n)


def test_multi_cycle_run_promotes_the_better_candidate_and_rolls_back_the_one_that_regresses(store_url, tmp_path):
    cfg_path = write_config(tmp_path, store_url)
    cfg = load_config(cfg_path)
    route = cfg.route("chat")
    gateway = get_gateway(route.gateway, route)
    engine = get_engine(store_url)
    rng = np.random.default_rng(7)

    decisions = []
    for cycle in range(11):
        fragile_p = 0.62 if cycle < 3 else 0.2  # a regression shows up in the fourth cycle
        verdicts = [simulated_verdict("fragile", fragile_p, 150, rng), simulated_verdict("better", 0.68, 150, rng)]
        outcome = step_route(engine, route, verdicts, gateway=gateway, now=T0 + timedelta(minutes=30 * cycle),
                             run_id=None, analysis_link=f"http://mlflow.local/#/runs/cycle-{cycle}")
        assert outcome.status in ("applied", "unchanged"), outcome.reason
        decisions.append((outcome.decision, outcome.weights_after["fragile"], outcome.weights_after["better"]))

    assert decisions[:4] == [("advance", 1, 0), ("advance", 5, 0), ("advance", 25, 0), ("rollback", 0, 0)]
    assert decisions[4:9] == [("advance", 0, 1), ("advance", 0, 5), ("advance", 0, 25), ("advance", 0, 50),
                              ("promote", 0, 100)]
    assert all(d[0] == "hold" for d in decisions[9:])  # promoted: the config's incumbent is stale until updated

    state = load_rollout_state(engine, route)
    assert state.serving == "better" and state.phase == "promoted" and "fragile" in state.failed
    assert gateway.read_back() == {"inc": 0, "fragile": 0, "better": 100}

    result = runner.invoke(routes_cli, ["history", "chat", "--config", str(cfg_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["decision"] for r in reversed(rows)] == ["advance"] * 3 + ["rollback"] + ["advance"] * 4 + ["promote"]
    assert all(r["status"] == "applied" for r in rows)
    assert rows[5]["before"] == {"inc": 75, "fragile": 25, "better": 0} and rows[5]["after"]["fragile"] == 0
    assert rows[5]["analysis_link"] == "http://mlflow.local/#/runs/cycle-3"
    table = runner.invoke(routes_cli, ["history", "chat", "--config", str(cfg_path)])
    assert table.exit_code == 0 and "rollback" in table.output and "promote" in table.output
    show = runner.invoke(routes_cli, ["show", "chat", "--config", str(cfg_path), "--json"])
    assert json.loads(show.output)[0]["config_stale"] is True


def test_stepping_the_same_run_twice_changes_nothing_the_second_time(store_url, tmp_path):
    route = load_config(write_config(tmp_path, store_url)).route("chat")
    engine, gateway = get_engine(store_url), get_gateway(route.gateway, route)
    run_id = make_run(engine, "chat:1")
    first = step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=gateway, now=T0,
                       run_id=run_id)
    again = step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=gateway,
                       now=T0 + timedelta(hours=5), run_id=run_id)
    assert first.decision == "advance" and again.replayed and again.decision == "advance"
    assert again.weights_after == first.weights_after
    assert len(route_history(engine, "chat")) == 1
    assert load_rollout_state(engine, route).weights["fragile"] == 1


def test_rerunning_an_older_run_or_the_last_one_after_a_manual_rollback_never_steps_again(store_url, tmp_path):
    """`shadowjudge run --cycle-id OLD` resumes an old run: its verdicts are stale once a later run was applied."""
    route = load_config(write_config(tmp_path, store_url, policy={"steps": [1, 5, 25, 50, 100]})).route("chat")
    engine, gateway = get_engine(store_url), get_gateway(route.gateway, route)
    passing = [CandidateVerdict("fragile", "pass", n=200)]
    r1, r2 = make_run(engine, "chat:1"), make_run(engine, "chat:2")
    step_route(engine, route, passing, gateway=gateway, now=T0, run_id=r1)
    step_route(engine, route, passing, gateway=gateway, now=T0 + timedelta(hours=1), run_id=r2)
    assert load_rollout_state(engine, route).weights["fragile"] == 5
    stale = step_route(engine, route, passing, gateway=gateway, now=T0 + timedelta(hours=2), run_id=r1)
    assert stale.replayed and stale.status == "unchanged" and "older than run" in stale.reason
    assert load_rollout_state(engine, route).weights["fragile"] == 5 and len(route_history(engine, "chat")) == 2

    result = runner.invoke(routes_cli, ["rollback", "chat", "-c", str(tmp_path / "shadowjudge.yaml")])
    assert result.exit_code == 0, result.output
    again = step_route(engine, route, passing, gateway=gateway, now=T0 + timedelta(hours=3), run_id=r2)
    assert again.replayed and again.status == "unchanged"
    assert load_rollout_state(engine, route).weights["fragile"] == 0  # the rollback stands


def test_a_retried_failed_push_counts_its_runs_evidence_once(store_url, tmp_path):
    policy = {"kind": "bandit", "min_dwell_s": 0, "min_samples_per_step": 0}
    cfg_path = write_config(tmp_path, store_url, policy=policy)
    route = load_config(cfg_path).route("chat")
    engine, good = get_engine(store_url), get_gateway(route.gateway, route)
    refusing = TrueFoundryGateway(route, Path(route.gateway.path), ["sh", "-c", "exit 3"])
    run_id = make_run(engine, "chat:1")
    verdicts = [CandidateVerdict("better", "pass", score=0.7, n=100)]
    failed = step_route(engine, route, verdicts, gateway=refusing, now=T0, run_id=run_id)
    assert failed.status == "failed"
    counted = load_rollout_state(engine, route).posteriors["better"]
    assert (counted.alpha, counted.beta) == pytest.approx((71.0, 31.0))
    retried = step_route(engine, route, verdicts, gateway=good, now=T0 + timedelta(minutes=5), run_id=run_id)
    assert retried.status == "applied" and not retried.replayed
    assert load_rollout_state(engine, route).posteriors["better"] == counted


def test_a_candidate_without_samples_does_not_hold_back_the_one_the_ladder_starts(store_url, tmp_path):
    route = load_config(write_config(tmp_path, store_url, policy={"steps": [1, 5, 100], "min_samples_per_step": 100})
                        ).route("chat")
    engine, gateway = get_engine(store_url), get_gateway(route.gateway, route)
    verdicts = [CandidateVerdict("fragile", "inconclusive", n=0), CandidateVerdict("better", "pass", n=300)]
    outcome = step_route(engine, route, verdicts, gateway=gateway, now=T0, run_id=make_run(engine, "chat:1"))
    assert outcome.decision == "advance" and outcome.weights_after["better"] == 1, outcome.reason


def _edit_yaml(change):
    def edit(path: Path) -> None:
        doc = yaml.safe_load(path.read_text())
        change(doc)
        path.write_text(yaml.safe_dump(doc))
    return edit


@pytest.mark.parametrize("edit", [
    lambda f: f.write_bytes(f.read_bytes() + b"\n# \xff\n"),
    _edit_yaml(lambda doc: doc.update(rules=None)),
    _edit_yaml(lambda doc: doc["rules"][0].update(load_balance_targets=None)),
], ids=["not-utf8", "null-rules", "null-targets"])
def test_a_hand_edited_gateway_file_of_an_odd_shape_is_reported_not_raised(store_url, tmp_path, edit):
    cfg_path = write_config(tmp_path, store_url)
    route = load_config(cfg_path).route("chat")
    engine, gateway = get_engine(store_url), get_gateway(route.gateway, route)
    step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=gateway, now=T0)
    edit(Path(route.gateway.path))
    held = step_route(engine, route, [], gateway=gateway, now=T0 + timedelta(hours=1),
                      run_id=make_run(engine, "chat:2"))
    assert held.status in ("failed", "unchanged") and str(route.gateway.path) in f"{held.error} {held.reason}"
    result = runner.invoke(routes_cli, ["step", "chat", "-c", str(cfg_path), "--dry-run"])
    assert result.exit_code in (0, 2) and "Traceback" not in result.output
    assert "UnicodeDecodeError" not in result.output and "AttributeError" not in result.output


class LyingOnceGateway(TrueFoundryGateway):
    """Reports other weights on its first read-back, as a gateway that normalised or ignored the push would."""

    lied = False

    def read_back(self):
        weights = super().read_back()
        if not self.lied:
            self.lied = True
            return {**weights, "inc": weights["inc"] - 1, "fragile": weights["fragile"] + 1}
        return weights


@pytest.mark.parametrize("fault", ["down", "rejects", "reads_back_other"])
def test_a_faulty_gateway_keeps_its_previous_config_and_the_step_is_retried_next_cycle(store_url, tmp_path, fault):
    cfg_path = write_config(tmp_path, store_url)
    route = load_config(cfg_path).route("chat")
    engine = get_engine(store_url)
    good = get_gateway(route.gateway, route)
    step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=good, now=T0)
    file = Path(route.gateway.path)
    before_bytes = file.read_bytes()

    if fault == "down":
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("")
        faulty = TrueFoundryGateway(route, blocker / "routing.yaml")
    elif fault == "rejects":
        faulty = TrueFoundryGateway(route, file, ["sh", "-c", "echo 'control plane: weights refused' >&2; exit 3"])
    else:
        faulty = LyingOnceGateway(route, file)
    outcome = step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=faulty,
                         now=T0 + timedelta(hours=1), run_id=make_run(engine, "chat:2"))
    assert outcome.status == "failed" and not outcome.pushed
    assert outcome.proposed["fragile"] == 5 and outcome.weights_after["fragile"] == 1
    expected_error = {"down": "GatewayUnavailable", "rejects": "GatewayRejected",
                      "reads_back_other": "GatewayReadBackMismatch"}[fault]
    assert outcome.error.startswith(expected_error)
    assert file.read_bytes() == before_bytes  # the previous config is in force
    assert load_rollout_state(engine, route).weights["fragile"] == 1  # not advanced
    last = route_history(engine, "chat")[0]
    assert last["status"] == "failed" and last["error"].startswith(expected_error) and last["after"]["fragile"] == 5

    retried = step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=good,
                         now=T0 + timedelta(hours=2), run_id=make_run(engine, "chat:3"))
    assert retried.status == "applied" and retried.weights_after["fragile"] == 5


def test_an_invalid_rendered_config_is_never_written(store_url, tmp_path):
    cfg_path = write_config(tmp_path, store_url)
    route = load_config(cfg_path).route("chat")
    file = Path(route.gateway.path)
    file.parent.mkdir(parents=True)
    # The user's rule for the route has no `when.models`: TrueFoundry would refuse the file, so we never write it.
    file.write_text("name: corp\ntype: gateway-load-balancing-config\nrules:\n  - id: chat\n    type: weight-based-routing\n"
                    "    load_balance_targets:\n      - target: acct/m-inc\n        weight: 100\n")
    before = file.read_bytes()
    outcome = step_route(get_engine(store_url), route, [CandidateVerdict("fragile", "pass", n=200)],
                         gateway=get_gateway(route.gateway, route), now=T0)
    assert outcome.status == "failed" and "when.models" in outcome.error
    assert file.read_bytes() == before and not file.with_name("routing.yaml.prev").exists()


def test_a_rollback_the_gateway_refused_is_pushed_again_next_cycle_even_if_the_verdict_recovers(store_url, tmp_path):
    route = load_config(write_config(tmp_path, store_url, policy={"steps": [10, 100]})).route("chat")
    engine, good = get_engine(store_url), get_gateway(route.gateway, route)
    step_route(engine, route, [CandidateVerdict("fragile", "pass")], gateway=good, now=T0)
    refusing = TrueFoundryGateway(route, route.gateway.path, ["false"])
    failed = step_route(engine, route, [CandidateVerdict("fragile", "fail")], gateway=refusing, now=T0 + timedelta(hours=1))
    assert failed.decision == "rollback" and failed.status == "failed"
    assert load_rollout_state(engine, route).phase == "rolling_back"
    retried = step_route(engine, route, [CandidateVerdict("fragile", "pass")], gateway=good, now=T0 + timedelta(hours=2))
    assert retried.decision == "rollback" and retried.status == "applied" and retried.weights_after["fragile"] == 0


class BlockingGateway(TrueFoundryGateway):
    """Holds its push until released, so a second writer arrives while the first holds the route."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entered, self.release = threading.Event(), threading.Event()

    def push(self, rendered):
        self.entered.set()
        assert self.release.wait(30)
        super().push(rendered)


def test_two_concurrent_writers_one_pushes_the_other_is_told_the_route_is_busy(store_url, tmp_path):
    route = load_config(write_config(tmp_path, store_url)).route("chat")
    engine = get_engine(store_url)
    first_gw = BlockingGateway(route, route.gateway.path)
    runs = [make_run(engine, "chat:1"), make_run(engine, "chat:2")]
    results = {}

    def first_writer():
        results["first"] = step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=first_gw,
                                      now=T0, run_id=runs[0])

    thread = threading.Thread(target=first_writer)
    thread.start()
    assert first_gw.entered.wait(30)
    second = step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)],
                        gateway=get_gateway(route.gateway, route), now=T0, run_id=runs[1])
    first_gw.release.set()
    thread.join(30)
    assert second.decision == "busy" and not second.pushed and "holds the lock 'route:chat'" in second.reason
    assert results["first"].status == "applied"
    assert len(route_history(engine, "chat")) == 1


def test_dry_run_prints_the_diff_and_writes_nothing(store_url, tmp_path):
    cfg_path = write_config(tmp_path, store_url)
    route = load_config(cfg_path).route("chat")
    engine = get_engine(store_url)
    outcome = step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)],
                         gateway=get_gateway(route.gateway, route), now=T0, dry_run=True)
    assert outcome.status == "dry_run" and outcome.proposed["fragile"] == 1
    assert "+        weight: 1" in outcome.config_diff
    assert not Path(route.gateway.path).exists() and route_history(engine, "chat") == []
    verdicts = tmp_path / "verdicts.json"
    verdicts.write_text('[{"target": "fragile", "verdict": "pass", "n": 200, "score": 0.6}]')
    result = runner.invoke(routes_cli, ["step", "chat", "--config", str(cfg_path), "--verdicts", str(verdicts),
                                        "--dry-run"])
    assert result.exit_code == 0 and "inc 100→99, fragile 0→1" in result.output and "weight: 1" in result.output
    assert not Path(route.gateway.path).exists() and route_history(engine, "chat") == []


def test_a_hand_edited_gateway_is_kept_and_the_drift_reported(store_url, tmp_path):
    route = load_config(write_config(tmp_path, store_url)).route("chat")
    engine, gateway = get_engine(store_url), get_gateway(route.gateway, route)
    step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=gateway, now=T0)
    file = Path(route.gateway.path)
    file.write_text(file.read_text().replace("weight: 99", "weight: 50").replace("weight: 1\n", "weight: 50\n"))
    edited = file.read_bytes()
    outcome = step_route(engine, route, [CandidateVerdict("fragile", "inconclusive")], gateway=gateway,
                         now=T0 + timedelta(hours=1))
    assert outcome.decision == "hold" and outcome.status == "unchanged" and file.read_bytes() == edited
    assert "gateway drift: it holds inc=50, fragile=50, better=0 where the state recorded inc=99, fragile=1" in (
        outcome.reason)
    state = load_rollout_state(engine, route)
    assert state.weights == {"inc": 50, "fragile": 50, "better": 0} and state.step_started_at == T0 + timedelta(hours=1)
    assert len(route_history(engine, "chat")) == 1  # nothing pushed


def test_a_gateway_reset_by_hand_is_stepped_from_what_it_holds(store_url, tmp_path):
    """The step limit and the ladder apply to what the gateway holds: a file reset to 100/0 between steps restarts
    the ladder at its first rung instead of promoting the candidate from 0% to 100% in one push."""
    policy = {"steps": [5, 25, 50, 100], "max_step_change": 50}
    route = load_config(write_config(tmp_path, store_url, policy=policy)).route("chat")
    engine, gateway = get_engine(store_url), get_gateway(route.gateway, route)
    for cycle in range(3):
        step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=gateway,
                   now=T0 + timedelta(hours=cycle))
    assert gateway.read_back() == {"inc": 50, "fragile": 50, "better": 0}
    file = Path(route.gateway.path)
    file.write_text(gateway.render_text(file.read_text(), {"inc": 100, "fragile": 0, "better": 0}))

    outcome = step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=gateway,
                         now=T0 + timedelta(hours=3))
    assert outcome.decision == "advance" and outcome.diff == "inc 100→95, fragile 0→5", outcome.reason
    assert "gateway drift: it holds inc=100, fragile=0, better=0" in outcome.reason
    assert gateway.read_back() == {"inc": 95, "fragile": 5, "better": 0}
    last = route_history(engine, "chat")[0]
    assert last["before"] == {"inc": 100, "fragile": 0, "better": 0} and last["after"]["fragile"] == 5


class Killed(BaseException):
    """The writer process dying: not an Exception, so nothing in the push catches it."""


class DiesAfterPushing(TrueFoundryGateway):
    def read_back(self):
        raise Killed()


def test_a_writer_that_died_after_its_push_is_not_stepped_twice_by_the_rerun(store_url, tmp_path):
    route = load_config(write_config(tmp_path, store_url, policy={"steps": [1, 5, 25]})).route("chat")
    engine, gateway = get_engine(store_url), get_gateway(route.gateway, route)
    passing = [CandidateVerdict("fragile", "pass", n=200)]
    step_route(engine, route, passing, gateway=gateway, now=T0, run_id=make_run(engine, "chat:1"))
    run_id = make_run(engine, "chat:2")
    with pytest.raises(Killed):  # the push landed; its outcome was never recorded
        step_route(engine, route, passing, gateway=DiesAfterPushing(route, route.gateway.path),
                   now=T0 + timedelta(hours=1), run_id=run_id)
    assert gateway.read_back()["fragile"] == 5 and load_rollout_state(engine, route).weights["fragile"] == 1
    rerun = step_route(engine, route, passing, gateway=gateway, now=T0 + timedelta(hours=1), run_id=run_id)
    assert rerun.status == "applied" and "drift" not in rerun.reason
    assert gateway.read_back()["fragile"] == 5 == load_rollout_state(engine, route).weights["fragile"]
    assert [r["status"] for r in route_history(engine, "chat")] == ["applied", "interrupted", "applied"]


def test_rollback_dry_run_previews_what_the_rollback_would_push(store_url, tmp_path):
    cfg_path = write_config(tmp_path, store_url)
    route = load_config(cfg_path).route("chat")
    engine, gateway = get_engine(store_url), get_gateway(route.gateway, route)
    step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=gateway, now=T0)
    file = Path(route.gateway.path)
    before = file.read_bytes()
    preview = manual_rollback(engine, route, gateway=gateway, now=T0 + timedelta(hours=1), dry_run=True)
    assert preview.status == "dry_run" and preview.proposed == {"inc": 100, "fragile": 0, "better": 0}
    assert "-        weight: 1" in preview.config_diff
    assert file.read_bytes() == before and len(route_history(engine, "chat")) == 1
    assert load_rollout_state(engine, route).failed == {}
    result = runner.invoke(routes_cli, ["rollback", "chat", "-c", str(cfg_path), "--dry-run", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["proposed"] == preview.proposed
    bad = runner.invoke(routes_cli, ["rollback", "chat", "-c", str(cfg_path), "--dry-run", "--to", "nobody"])
    assert bad.exit_code == 2 and "cannot roll back to 'nobody'" in bad.output


def test_a_manual_rollback_the_gateway_refused_is_retried_by_the_next_cycle(store_url, tmp_path):
    route = load_config(write_config(tmp_path, store_url, policy={"steps": [5, 25, 100]})).route("chat")
    engine, good = get_engine(store_url), get_gateway(route.gateway, route)
    passing = [CandidateVerdict("fragile", "pass", n=200)]
    step_route(engine, route, passing, gateway=good, now=T0)
    refusing = TrueFoundryGateway(route, route.gateway.path, ["false"])
    failed = manual_rollback(engine, route, gateway=refusing, now=T0 + timedelta(minutes=5))
    assert failed.status == "failed" and good.read_back()["fragile"] == 5
    state = load_rollout_state(engine, route)
    assert "fragile" in state.failed and state.phase == "rolling_back"
    retried = step_route(engine, route, passing, gateway=good, now=T0 + timedelta(hours=1))
    assert retried.decision == "rollback" and retried.status == "applied", retried.reason
    assert retried.weights_after["fragile"] == 0 and good.read_back()["fragile"] == 0


def test_a_manual_rollback_takes_traffic_from_what_the_gateway_holds(store_url, tmp_path):
    """A hand edit gave a candidate traffic the state does not record: the rollback is decided from the gateway,
    so that candidate is marked failed and the next cycle does not ramp it back up."""
    route = load_config(write_config(tmp_path, store_url, policy={"steps": [5, 25, 100]})).route("chat")
    engine, gateway = get_engine(store_url), get_gateway(route.gateway, route)
    step_route(engine, route, [], gateway=gateway, now=T0)
    file = Path(route.gateway.path)
    file.write_text(gateway.render_text(file.read_text(), {"inc": 50, "fragile": 50, "better": 0}))
    outcome = manual_rollback(engine, route, gateway=gateway, now=T0 + timedelta(minutes=5))
    assert outcome.status == "applied" and outcome.diff == "inc 50→100, fragile 50→0", outcome.reason
    assert "fragile 50→0" in outcome.reason and gateway.read_back() == {"inc": 100, "fragile": 0, "better": 0}
    assert "fragile" in load_rollout_state(engine, route).failed
    after = step_route(engine, route, [CandidateVerdict("fragile", "pass", n=200)], gateway=gateway,
                       now=T0 + timedelta(hours=1))
    assert after.weights_after["fragile"] == 0, after.reason


def test_operator_commands_gate_freeze_and_roll_back(store_url, tmp_path):
    cfg_path = write_config(tmp_path, store_url, policy={"manual_gate": True})
    route = load_config(cfg_path).route("chat")
    engine, gateway = get_engine(store_url), get_gateway(route.gateway, route)
    passing = [CandidateVerdict("fragile", "pass", n=200)]
    first = step_route(engine, route, passing, gateway=gateway, now=T0)
    assert first.proposed == first.weights_before and "waiting for approval" in first.reason
    assert first.decision == "reconcile" and gateway.read_back()["inc"] == 100  # the gateway had no config yet
    assert runner.invoke(routes_cli, ["approve", "chat", "--config", str(cfg_path)]).exit_code == 0
    assert step_route(engine, route, passing, gateway=gateway, now=T0 + timedelta(minutes=1)).decision == "advance"

    assert runner.invoke(routes_cli, ["freeze", "chat", "--config", str(cfg_path)]).exit_code == 0
    assert runner.invoke(routes_cli, ["approve", "chat", "--config", str(cfg_path)]).exit_code == 0
    held = step_route(engine, route, passing, gateway=gateway, now=T0 + timedelta(minutes=2))
    assert held.decision == "hold" and "frozen" in held.reason
    assert runner.invoke(routes_cli, ["unfreeze", "chat", "--config", str(cfg_path)]).exit_code == 0

    preview = runner.invoke(routes_cli, ["rollback", "chat", "--config", str(cfg_path), "--dry-run"])
    assert preview.exit_code == 0 and "fragile 1→0" in preview.output
    assert load_rollout_state(engine, route).weights["fragile"] == 1
    done = runner.invoke(routes_cli, ["rollback", "chat", "--config", str(cfg_path), "--reason", "pager: bad answers"])
    assert done.exit_code == 0, done.output
    assert gateway.read_back() == {"inc": 100, "fragile": 0, "better": 0}
    state = load_rollout_state(engine, route)
    assert "fragile" in state.failed and state.phase == "rolled_back"
    last = route_history(engine, "chat")[0]
    assert last["decision"] == "manual_rollback" and "pager: bad answers" in last["reason"]

    bad = runner.invoke(routes_cli, ["rollback", "chat", "--config", str(cfg_path), "--to", "nobody"])
    assert bad.exit_code == 2 and "cannot roll back to 'nobody'" in bad.output
    missing = runner.invoke(routes_cli, ["history", "nope", "--config", str(cfg_path)])
    assert missing.exit_code == 2 and "no route named 'nope'" in missing.output


def test_routes_sharing_one_gateway_file_never_push_at_the_same_time(store_url, tmp_path):
    route = load_config(write_config(tmp_path, store_url)).route("chat")
    other = route.model_copy(update={"name": "chat-eu"}, deep=True)
    engine = get_engine(store_url)
    blocking = BlockingGateway(route, route.gateway.path)
    thread = threading.Thread(target=lambda: step_route(engine, route, [CandidateVerdict("fragile", "pass")],
                                                         gateway=blocking, now=T0))
    thread.start()
    assert blocking.entered.wait(30)
    second = step_route(engine, other, [CandidateVerdict("fragile", "pass")],
                        gateway=get_gateway(other.gateway, other), now=T0)
    blocking.release.set()
    thread.join(30)
    assert second.decision == "busy" and "gateway:truefoundry:" in second.reason
    again = step_route(engine, other, [CandidateVerdict("fragile", "pass")], gateway=get_gateway(other.gateway, other),
                       now=T0 + timedelta(minutes=1))
    assert again.status == "applied"
    rules = {r["id"]: r for r in yaml.safe_load(Path(route.gateway.path).read_text())["rules"]}
    assert set(rules) == {"chat", "chat-eu"}  # neither route's push overwrote the other's rule


def test_stored_reasons_and_errors_are_shown_verbatim_and_bad_ids_are_refused(store_url, tmp_path):
    """Reasons and errors quote slice names and gateway text ('[/INST]'); read as Rich markup they crashed
    `routes history` and `show` with a traceback. A run id past BIGINT overflowed the driver (exit 1)."""
    from sqlalchemy import update

    from shadowjudge.store import RouteState, RouteWeightChange

    cfg_path = write_config(tmp_path, store_url)
    route = load_config(cfg_path).route("chat")
    engine = get_engine(store_url)
    step_route(engine, route, [CandidateVerdict("better", "pass", score=0.7, n=150)],
               gateway=get_gateway(route.gateway, route), now=T0, run_id=None)
    with session_scope(engine) as s:
        s.execute(update(RouteWeightChange).values(reason="slice prompt=[/INST] regressed", error="bad [/x] tag"))
        row = s.get(RouteState, "chat")
        row.last_outcome = {**(row.last_outcome or {}), "reason": "last [/INST] reason"}
    history = runner.invoke(routes_cli, ["history", "chat", "--config", str(cfg_path)])
    assert history.exit_code == 0, history.output
    assert "[/INST]" in history.output and "[/x]" in history.output
    shown = runner.invoke(routes_cli, ["show", "chat", "--config", str(cfg_path)])
    assert shown.exit_code == 0 and "last [/INST] reason" in shown.output, shown.output
    huge = runner.invoke(routes_cli, ["step", "chat", "-c", str(cfg_path), "--run-id", str(2 ** 63)])
    assert huge.exit_code == 2 and "Traceback" not in huge.output


def test_undoing_a_promotion_the_gateway_refused_leaves_the_state_as_it_was(store_url, tmp_path):
    """A refused `rollback --to <incumbent>` after a promotion marked the promoted, serving target failed and
    `rolling_back`, which the controller never retries for a serving target: the route held, 'config stale'."""
    route = load_config(write_config(tmp_path, store_url, policy={"steps": [100]})).route("chat")
    engine, good = get_engine(store_url), get_gateway(route.gateway, route)
    passing = [CandidateVerdict("better", "pass", n=200)]
    for hours in range(4):
        step_route(engine, route, passing, gateway=good, now=T0 + timedelta(hours=hours))
    promoted = load_rollout_state(engine, route)
    assert (promoted.serving, promoted.phase) == ("better", "promoted"), promoted
    refusing = TrueFoundryGateway(route, route.gateway.path, ["false"])
    failed = manual_rollback(engine, route, gateway=refusing, to="inc", now=T0 + timedelta(hours=5))
    assert failed.status == "failed" and good.read_back()["better"] == 100
    state = load_rollout_state(engine, route)
    assert (state.serving, state.phase, "better" in state.failed) == ("better", "promoted", False)
    undone = manual_rollback(engine, route, gateway=good, to="inc", now=T0 + timedelta(hours=6))
    assert undone.status == "applied" and good.read_back()["inc"] == 100


def test_a_step_that_finds_the_route_locked_exits_non_zero_as_freeze_does(store_url, tmp_path):
    from shadowjudge.routing.step import lock_name
    from shadowjudge.store.lease import LeaseLock

    cfg_path = write_config(tmp_path, store_url)
    engine = get_engine(store_url)
    verdicts = tmp_path / "verdicts.json"
    verdicts.write_text('[{"target": "fragile", "verdict": "pass", "n": 200, "score": 0.6}]')
    other = LeaseLock(engine, lock_name("chat"), holder="otherhost:1:abcd")
    assert other.acquire()
    try:
        result = runner.invoke(routes_cli, ["step", "chat", "-c", str(cfg_path), "--verdicts", str(verdicts)])
        said = " ".join(result.output.split())  # the error line wraps at the console's width
        assert result.exit_code == 1 and "otherhost:1:abcd" in said and "nothing was decided or applied" in said
        as_json = runner.invoke(routes_cli, ["step", "chat", "-c", str(cfg_path), "--verdicts", str(verdicts),
                                             "--json"])
        assert as_json.exit_code == 1 and '"status": "busy"' in as_json.stdout
    finally:
        other.release()
    assert route_history(engine, "chat") == [] and not Path(load_config(cfg_path).route("chat").gateway.path).exists()
    done = runner.invoke(routes_cli, ["step", "chat", "-c", str(cfg_path), "--verdicts", str(verdicts)])
    assert done.exit_code == 0 and "fragile 0→1" in done.output


def test_a_verdicts_file_that_is_not_utf8_is_refused_naming_the_file(store_url, tmp_path):
    cfg_path = write_config(tmp_path, store_url)
    verdicts = tmp_path / "verdicts.json"
    verdicts.write_bytes(b'[{"target": "fragile", "verdict": "pass", "note": "\xff"}]')
    result = runner.invoke(routes_cli, ["step", "chat", "-c", str(cfg_path), "--verdicts", str(verdicts)])
    said = "".join(result.output.split())  # the error line wraps (a long path mid-word) at the console's width
    assert result.exit_code == 2 and f"{verdicts}:notUTF-8text" in said, result.output
    assert "Traceback" not in said and "UnicodeDecodeError" not in said


def _promote_better(store_url, tmp_path):
    """'better' promoted in two passing steps: it serves the route while the config still names 'inc'."""
    cfg_path = write_config(tmp_path, store_url, policy={"steps": [50, 100]})
    route = load_config(cfg_path).route("chat")
    engine, gateway = get_engine(store_url), get_gateway(route.gateway, route)
    for i in range(2):
        step_route(engine, route, [CandidateVerdict("better", "pass", n=200)], gateway=gateway,
                   now=T0 + timedelta(hours=i))
    assert load_rollout_state(engine, route).serving == "better"
    return cfg_path, route, engine, gateway


def test_a_promoted_candidate_that_regresses_is_rolled_back_in_the_gateway_and_the_store(store_url, tmp_path):
    cfg_path, route, engine, gateway = _promote_better(store_url, tmp_path)
    regressed = step_route(engine, route, [CandidateVerdict("better", "fail", score=0.1, n=200, critical_alert=True)],
                           gateway=gateway, now=T0 + timedelta(hours=3))
    assert regressed.decision == "rollback" and regressed.status == "applied" and regressed.serving == "inc"
    assert gateway.read_current().weights == {"inc": 100, "fragile": 0, "better": 0}
    state = load_rollout_state(engine, route)
    assert state.serving == "inc" and "better" in state.failed
    show = runner.invoke(routes_cli, ["show", "chat", "-c", str(cfg_path), "--json"])
    assert show.exit_code == 0 and json.loads(show.stdout)[0]["config_stale"] is False


def _promote_better_then_refuse_its_rollback(store_url, tmp_path):
    """'better' promoted (serving, the config still names 'inc'), then judged failing while the gateway refuses the
    rollback: the rollback of the serving target is pending."""
    cfg_path, route, engine, good = _promote_better(store_url, tmp_path)
    refusing = TrueFoundryGateway(route, route.gateway.path, ["false"])
    failed = step_route(engine, route, [CandidateVerdict("better", "fail", score=0.1, n=200)], gateway=refusing,
                        now=T0 + timedelta(hours=2))
    assert failed.decision == "rollback" and failed.status == "failed" and good.read_back()["better"] == 100
    return cfg_path, route, engine, good


def test_a_pending_rollback_of_the_serving_target_is_stored_and_pushed_again_next_cycle(store_url, tmp_path):
    _, route, engine, good = _promote_better_then_refuse_its_rollback(store_url, tmp_path)
    state = load_rollout_state(engine, route)
    assert (state.serving, state.phase, state.pending_rollback) == ("better", "rolling_back", "better")
    retried = step_route(engine, route, [CandidateVerdict("better", "pass", n=200)], gateway=good,
                         now=T0 + timedelta(hours=3))
    assert retried.decision == "rollback" and retried.status == "applied" and retried.serving == "inc"
    assert good.read_back()["inc"] == 100 and load_rollout_state(engine, route).pending_rollback is None


@pytest.mark.parametrize("last_decision, pending", [("rollback", "better"), ("manual_rollback", None)])
def test_state_stored_before_pending_rollbacks_were_kept_still_loads(store_url, tmp_path, last_decision, pending):
    """A row written before `pending_rollback` was stored: the controller's own refused rollback of the serving
    target is read from its last outcome; a refused manual rollback, which leaves the same phase, is not one."""
    from shadowjudge.store import RouteState

    _, route, engine, _ = _promote_better_then_refuse_its_rollback(store_url, tmp_path)
    with session_scope(engine) as s:
        row = s.get(RouteState, route.name)
        row.policy_state = {k: v for k, v in row.policy_state.items() if k != "pending_rollback"}
        row.last_outcome = {**row.last_outcome, "decision": last_decision}
    state = load_rollout_state(engine, route)
    assert (state.serving, state.phase, state.pending_rollback) == ("better", "rolling_back", pending)


def test_a_step_that_finds_the_gateway_locked_says_it_is_the_gateways_lock(store_url, tmp_path):
    from shadowjudge.routing.step import gateway_lock_name
    from shadowjudge.store.lease import LeaseLock

    cfg_path = write_config(tmp_path, store_url)
    route = load_config(cfg_path).route("chat")
    engine = get_engine(store_url)
    verdicts = tmp_path / "verdicts.json"
    verdicts.write_text('[{"target": "fragile", "verdict": "pass", "n": 200, "score": 0.6}]')
    held = gateway_lock_name(get_gateway(route.gateway, route).name)
    other = LeaseLock(engine, held, holder="otherhost:2:beef")  # another route's step on the same gateway file
    assert other.acquire()
    try:
        result = runner.invoke(routes_cli, ["step", "chat", "-c", str(cfg_path), "--verdicts", str(verdicts)])
    finally:
        other.release()
    said = " ".join(result.stderr.split())  # the error line, which wraps at the console's width
    assert result.exit_code == 1 and said.startswith("error: route 'chat' was not stepped"), said
    # the long lock name (the gateway file's path) may wrap anywhere: compare without whitespace
    assert "".join(f"holds the lock '{held}'".split()) in "".join(said.split()) and "otherhost:2:beef" in said
    assert "the gateway's lock" in said and "nothing was decided or applied" in said


def test_a_verdicts_file_with_a_utf8_byte_order_mark_is_read(store_url, tmp_path):
    cfg_path = write_config(tmp_path, store_url)
    verdicts = tmp_path / "verdicts.json"
    verdicts.write_bytes(b'\xef\xbb\xbf[{"target": "fragile", "verdict": "pass", "n": 200, "score": 0.6}]')
    result = runner.invoke(routes_cli, ["step", "chat", "-c", str(cfg_path), "--verdicts", str(verdicts)])
    assert result.exit_code == 0 and "fragile 0→1" in result.output, result.output
