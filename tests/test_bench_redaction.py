"""bench/redaction_corpus.py reads an AlpacaEval-format directory and reports what the detectors change."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

from shadowjudge.config import RedactionConfig
from shadowjudge.traffic.redaction import Redactor

BENCH = Path(__file__).resolve().parent.parent / "bench" / "redaction_corpus.py"
sys.path.insert(0, str(BENCH.parent))
from redaction_corpus import ADVERSARIAL  # noqa: E402


def _write(path: Path, rows: list[dict]) -> None:
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)


def test_the_corpus_audit_counts_findings_by_kind_and_shows_them_as_written(tmp_path):
    _write(tmp_path / "prompts.jsonl.gz", [{"id": 1, "instruction": "Write to ada@example.com about lunch."},
                                           {"id": 2, "instruction": "What is 2147483647 in hex?"}])
    _write(tmp_path / "outputs.jsonl.gz", [{"model": "m", "prompt_id": 1, "output": "Dear Ada, my SSN is 123-45-6789."},
                                           {"model": "m", "prompt_id": 2, "output": "0x7FFFFFFF"},
                                           {"model": "n", "prompt_id": 2, "output": None}])
    out = subprocess.run([sys.executable, str(BENCH), "--data", str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    report = json.loads(out)
    assert (report["texts"], report["texts_changed"]) == (5, 2)
    assert report["findings_by_kind"] == {"EMAIL": 1, "SSN": 1}
    assert report["examples"]["SSN"] == ["Dear Ada, my SSN is 123-45-6789."]
    assert report["examples"]["EMAIL"][0].startswith("Write to ada@example.com")
    assert sorted(report["adversarial_ms"]) == sorted(ADVERSARIAL)  # every crafted text is timed


def test_every_crafted_text_is_redacted_and_a_second_redaction_changes_nothing_more():
    """The crafted texts are worst cases for speed; they must still come out of redaction stable."""
    redactor = Redactor.from_config(RedactionConfig())
    for name, text in ADVERSARIAL.items():
        once = redactor.redact(text, {})
        counts: dict[str, int] = {}
        assert redactor.redact(once, counts) == once and counts == {}, name


def test_a_directory_without_the_corpus_is_one_line_and_a_non_zero_exit(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--data", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "holds no prompts.jsonl.gz and outputs.jsonl.gz" in done.stderr


def test_the_crafted_chains_are_redacted_whole_and_the_abbreviation_runs_find_nothing():
    """Worst cases for speed that must also come out right: every link of a chain whose findings hide each other,
    and no phone where a run of `no.` ends in a character no phone's context holds."""
    redactor = Redactor.from_config(RedactionConfig())
    expected = {"glued_key_phone_chain": {"API_KEY": 750, "PHONE": 750}, "glued_cjk_domain_chain": {"EMAIL": 2400},
                "phone_abbreviation_runs": {}, "phone_glued_abbreviations": {}, "phone_separator_runs": {}}
    for name, counts in expected.items():
        found: dict[str, int] = {}
        redactor.redact(ADVERSARIAL[name], found)
        assert found == counts, name
