"""Redaction over a real corpus: what the PII detectors change in text that holds (almost) no PII.

Runs the built-in redactor (default RedactionConfig, cache off) over every instruction and every model output of
an AlpacaEval-format directory and prints ONE JSON object: texts read and changed, findings by kind, CPU seconds,
for each kind up to `--examples` findings as written, with the text around them, so a false positive can be read,
not only counted, and the CPU time of texts built to make a detector rescan (`adversarial_ms`). The instructions
and answers are general chat traffic, so nearly every finding here is a look-alike (an e-mail address in a sample
letter is real-shaped, a catalogue number shaped like an SSN is not PII).

    python bench/redaction_corpus.py [--data ../shared/data/alpacaeval] [--examples 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shadowjudge.config import RedactionConfig  # noqa: E402
from shadowjudge.traffic.redaction import Redactor  # noqa: E402

CONTEXT = 30  # characters shown either side of an example finding


def corpus_texts(data: Path) -> list[str]:
    """Every instruction, then every model's output, as stored in the directory's gzipped JSON lines."""
    texts: list[str] = []
    with gzip.open(data / "prompts.jsonl.gz", "rt") as fh:
        texts.extend(json.loads(line)["instruction"] for line in fh)
    with gzip.open(data / "outputs.jsonl.gz", "rt") as fh:
        texts.extend(json.loads(line)["output"] or "" for line in fh)
    return texts


def audit(texts: list[str], examples: int) -> dict:
    redactor = Redactor.from_config(RedactionConfig())
    redactor._cache_size = 0  # every text is redacted, as the first sight of a text is
    counts: dict[str, int] = {}
    shown: dict[str, list[str]] = {}
    changed = 0
    start = time.process_time()
    for text in texts:
        before = dict(counts)
        redacted = redactor.redact(text, counts)
        if redacted == text:
            continue
        changed += 1
        # the text's first finding, shown as it was: it starts where the redacted text first differs
        at = next(i for i, (a, b) in enumerate(zip(text, redacted + "\0" * len(text))) if a != b)
        kind = redacted[at + 1:redacted.find("]", at)]
        if kind in counts and counts[kind] != before.get(kind, 0) and len(shown.setdefault(kind, [])) < examples:
            shown[kind].append(text[max(0, at - CONTEXT):at + 2 * CONTEXT])
    cpu_s = time.process_time() - start
    return {"texts": len(texts), "chars": sum(map(len, texts)), "texts_changed": changed,
            "findings_by_kind": dict(sorted(counts.items())), "cpu_s": round(cpu_s, 3),
            "texts_per_cpu_s": round(len(texts) / cpu_s) if cpu_s else None, "examples": shown}


# Texts built to make a detector rescan (each about 24k characters): the worst case, not a typical text. A context
# word before thousands of candidates makes each candidate search the text before it; a finding glued to the next
# one makes a second pass over the whole text. A run of abbreviations (`no.`) or separators between a phone word
# and a character that ends its context is where a loop that can read a piece two ways backtracks exponentially
# (24 `no.` took 32 s); a chain of findings each hidden by the one before takes one pass per finding.
ADVERSARIAL = {"separator_runs": "a.." * 8000 + "@", "quote_runs": "a''" * 8000 + "@", "dot_runs": "a." * 12000 + "@",
               "cjk_separator_runs": "用.." * 8000 + "用@例子.公司", "digit_groups": "12-" * 8000,
               "phone_word_and_numbers": "phone " + "5551234567 " * 2200,
               "ssn_word_and_bare_numbers": "SSN " + "123456789 " * 2400,
               "part_label_and_ssns": "Part no. " + "123-45-6789, " * 1850,
               "unlisted_cjk_domain_labels": "a@" + "例." * 12000,
               "cjk_dot_latin_runs": ("張." * 100 + "a@b.co ") * 120,
               "full_width_at_runs": "ｊ＠" * 12000, "glued_findings": "x@y.co4111111111111111" * 1100,
               "phone_abbreviation_runs": ("phone " + "no." * 24 + "#4155550123\n") * 270,
               "phone_glued_abbreviations": ("call " + "dr.st." * 12 + ";4155550123 ") * 280,
               "phone_separator_runs": ("phone" + " -" * 35 + "#4155550123 ") * 280,
               "glued_key_phone_chain": "AKIAABCDEFGHIJKLMNOP+14155550100" * 750,
               "glued_cjk_domain_chain": "x@a.中文字符" * 2400}


def adversarial_ms() -> dict[str, float]:
    """CPU milliseconds to redact each ADVERSARIAL text once (best of three)."""
    redactor = Redactor.from_config(RedactionConfig())
    redactor._cache_size = 0
    out = {}
    for name, text in ADVERSARIAL.items():
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            redactor.redact(text, {})
            best = min(best, time.process_time() - start)
        out[name] = round(best * 1000, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "alpacaeval")
    parser.add_argument("--examples", type=int, default=3, help="findings shown per kind, with their context")
    args = parser.parse_args()
    if not (args.data / "prompts.jsonl.gz").is_file() or not (args.data / "outputs.jsonl.gz").is_file():
        sys.exit(f"error: {args.data} holds no prompts.jsonl.gz and outputs.jsonl.gz (the AlpacaEval format)")
    print(json.dumps({"data": str(args.data), **audit(corpus_texts(args.data), args.examples),
                      "adversarial_ms": adversarial_ms()}, ensure_ascii=False))


if __name__ == "__main__":
    main()
