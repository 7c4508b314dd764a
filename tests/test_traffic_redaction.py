"""PII redaction: each kind found and replaced by its placeholder, checksums respected, look-alikes left alone."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shadowjudge.config import RedactionConfig
from shadowjudge.traffic import redaction
from shadowjudge.traffic.redaction import Redactor, iban_valid, luhn_valid


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor.from_config(RedactionConfig(extra_patterns={"employee_id": r"EMP-[0-9]{6}"}))


def redact(redactor: Redactor, text: str) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    return redactor.redact(text, counts), counts


@pytest.mark.parametrize("value, kind", [
    ("jane.doe+tag@mail.example.co.uk", "EMAIL"),
    ("+1 415 555 0100", "PHONE"),
    ("(415) 555-0199", "PHONE"),
    ("415.555.0123", "PHONE"),
    ("+44 20 7946 0958", "PHONE"),
    ("020 7946 0958", "PHONE"),
    ("+33 6 12 34 56 78", "PHONE"),
    ("1-800-555-0100", "PHONE"),  # North American with the trunk code 1: the 1 goes too
    ("1 (800) 555-0100", "PHONE"),
    ("1.800.555.0100", "PHONE"),
    ("1 415 555 0100", "PHONE"),
    ("06 12 34 56 78", "PHONE"),  # French/European national numbers: 0 then nine digits in pairs
    ("06.12.34.56.78", "PHONE"),
    ("01-23-45-67-89", "PHONE"),
    ("00 44 20 7946 0958", "PHONE"),  # international, dialled with 00 or 011 instead of +
    ("0044 20 7946 0958", "PHONE"),
    ("011 44 20 7946 0958", "PHONE"),
    ("0033 6 12 34 56 78", "PHONE"),
    ("4111 1111 1111 1111", "CARD_NUMBER"),
    ("5500-0055-5555-5559", "CARD_NUMBER"),
    ("378282246310005", "CARD_NUMBER"),
    ("5555 5555 5555 4444", "CARD_NUMBER"),
    ("3782 822463 10005", "CARD_NUMBER"),
    ("6011-1111-1111-1117", "CARD_NUMBER"),
    ("GB82 WEST 1234 5698 7654 32", "IBAN"),
    ("DE89370400440532013000", "IBAN"),
    ("FR1420041010050500013M02606", "IBAN"),
    ("192.168.10.254", "IP_ADDRESS"),
    ("2001:db8:85a3::8a2e:370:7334", "IP_ADDRESS"),
    ("fe80::1ff:fe23:4567:890a", "IP_ADDRESS"),
    ("2001:db8::1", "IP_ADDRESS"),
    ("::1", "IP_ADDRESS"),
    ("::ffff:192.0.2.1", "IP_ADDRESS"),
    ("dead:beef::cafe", "IP_ADDRESS"),  # letters only, but three groups: not a code path
    ("sk-proj-abcdefghijklmnopqrstuvwxyz012345", "API_KEY"),
    ("sk-ant-api03-abcdefghijklmnopqrstuv", "API_KEY"),
    ("AKIAIOSFODNN7EXAMPLE", "API_KEY"),
    ("ghp_" + "a1B2" * 9, "API_KEY"),
    ("xoxb-123456789012-abcdefABCDEF", "API_KEY"),
    ("AIzaSyA-1234567890abcdefghijklmnopqrstu", "API_KEY"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.abcdefghijk", "API_KEY"),
    ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.", "API_KEY"),  # unsigned JWT (`alg: none`): empty signature
    ("8.8.8.8", "IP_ADDRESS"),  # 4 digits in all
    ("josé@bücher.de", "EMAIL"),
    ("josé.garcía@example.com", "EMAIL"),
    ("用户@例子.公司", "EMAIL"),  # a CJK local part and top-level domain
    ("山田@example.jp", "EMAIL"),
    ("사용자@예시.한국", "EMAIL"),
    ("gb82 west 1234 5698 7654 32", "IBAN"),  # IBANs typed in lower case
    ("de89370400440532013000", "IBAN"),
    ("fr14 2004 1010 0505 0001 3m02 606", "IBAN"),
    ("123-45-6789", "SSN"),
    ("EMP-123456", "EMPLOYEE_ID"),
])
def test_each_kind_is_replaced_by_its_placeholder(redactor, value, kind):
    text, counts = redact(redactor, f"Note: {value}, thanks.")
    assert text == f"Note: [{kind}], thanks."
    assert counts == {kind: 1}


def test_bearer_tokens_keep_the_scheme_word(redactor):
    text, counts = redact(redactor, "curl -H 'Authorization: Bearer abc.DEF-123_456~xyz=' https://x")
    assert text == "curl -H 'Authorization: Bearer [BEARER_TOKEN]' https://x" and counts == {"BEARER_TOKEN": 1}


@pytest.mark.parametrize("text, expected", [
    ("-H 'Authorization: Basic dXNlcjpwYXNzd29yZA=='", "-H 'Authorization: Basic [BEARER_TOKEN]'"),
    ("Authorization: Token 9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b", "Authorization: Token [BEARER_TOKEN]"),
    ('{"authorization": "basic dXNlcjpwYXNz"}', '{"authorization": "basic [BEARER_TOKEN]"}'),
    ("AUTHORIZATION=TOKEN 9944b09199c62bcf", "AUTHORIZATION=TOKEN [BEARER_TOKEN]"),
])
def test_basic_and_token_credentials_after_an_authorization_header_are_replaced(redactor, text, expected):
    assert redact(redactor, text) == (expected, {"BEARER_TOKEN": 1})


@pytest.mark.parametrize("text, expected", [
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_access_key = [API_KEY]"),
    ('{"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}', '{"AWS_SECRET_ACCESS_KEY": "[API_KEY]"}'),
    ("my aws secret is wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY, rotate it", "my aws secret is [API_KEY], rotate it"),
])
def test_an_aws_secret_access_key_after_its_keyword_is_replaced(redactor, text, expected):
    assert redact(redactor, text) == (expected, {"API_KEY": 1})


@pytest.mark.parametrize("text, expected", [
    ("mail müller@example.de", "mail [EMAIL]"),
    ("mail o'brien@example.com now", "mail [EMAIL] now"),
    ("mail zoë.smith@example.org", "mail [EMAIL]"),
    ("mail alice@例え.jp", "mail [EMAIL]"),
    # CJK text has no spaces: the sentence around an address with a Latin local part is kept; a CJK local part
    # takes the letters before it up to a space or punctuation, a CJK top-level domain ends where it is known to.
    ("请联系john@example.com获取帮助，谢谢", "请联系[EMAIL]获取帮助，谢谢"),
    ("邮箱：用户@example.cn。", "邮箱：[EMAIL]。"),
    ("请发到用户@例子.公司获取帮助", "[EMAIL]获取帮助"),
    ("メール：山田@example.jp までどうぞ", "メール：[EMAIL] までどうぞ"),
    # Combining marks: decomposed accents (e + U+0301) and Indic and Thai vowel signs do not cut an address in two.
    ("mail jose\u0301.garci\u0301a@example.com now", "mail [EMAIL] now"),
    ("mail अनुराग@example.in now", "mail [EMAIL] now"),
    ("mail राम@उदाहरण.भारत now", "mail [EMAIL] now"),
    ("mail สมชาย@ตัวอย่าง.ไทย now", "mail [EMAIL] now"),
    ("メールはtaro@example.comまでお願いします", "メールは[EMAIL]までお願いします"),
    ("write to josé@bücher.de now", "write to [EMAIL] now"),
    ("it's under my_name@example.com", "it's under [EMAIL]"),
    # Quotes and punctuation around an address stay out of it.
    ('contact "bob@example.com" or \'eve@example.com\'.', 'contact "[EMAIL]" or \'[EMAIL]\'.'),
    ("(bob@example.com), <bob@example.com>, «jean@example.fr», ...bob@example.com.",
     "([EMAIL]), <[EMAIL]>, «[EMAIL]», ...[EMAIL]."),
    ("name@example.com's inbox; email=bob@example.com,", "[EMAIL]'s inbox; email=[EMAIL],"),
])
def test_emails_with_unicode_or_apostrophes_are_replaced_whole(redactor, text, expected):
    out, counts = redact(redactor, text)
    assert out == expected and counts == {"EMAIL": expected.count("[EMAIL]")}


@pytest.mark.parametrize("text, expected", [
    ("call 5551234567 today", "call [PHONE] today"),
    ("Phone: 2125550123.", "Phone: [PHONE]."),
    ("tel:15551234567", "tel:[PHONE]"),  # with the trunk code 1
    ("| Mobile | 4155550100 |", "| Mobile | [PHONE] |"),
    ("my cell is 4155550100, thanks", "my cell is [PHONE], thanks"),
    ("phone (mobile): 5551234567", "phone (mobile): [PHONE]"),
    ("Contact John Smith at 2125550123", "Contact John Smith at [PHONE]"),
])
def test_a_bare_ten_digit_phone_number_right_after_a_phone_word_is_replaced(redactor, text, expected):
    assert redact(redactor, text) == (expected, {"PHONE": 1})


@pytest.mark.parametrize("text, expected", [
    # The words after an IBAN are no part of it, in upper case too: it ends where its country's IBANs end.
    ("iban GB82 WEST 1234 5698 7654 32 EUR", "iban [IBAN] EUR"),
    ("IBAN GB82WEST12345698765432 AND MORE", "IBAN [IBAN] AND MORE"),
    ("pay to gb82 west 1234 5698 7654 32 thanks", "pay to [IBAN] thanks"),
    ("Konto DE89 3704 0044 0532 0130 00 EUR 100", "Konto [IBAN] EUR 100"),
])
def test_an_iban_followed_by_words_is_replaced_alone(redactor, text, expected):
    assert redact(redactor, text) == (expected, {"IBAN": 1})


@pytest.mark.parametrize("text", [
    # Bare 10-digit runs without a phone word: order ids, maths, timestamps, ISBN-10s.
    "Order 5551234567 shipped on 2024-03-15; order id ORD-2125550123, ref #4155550100.",
    "2^31 - 1 = 2147483647, so 4000000000 overflows; 3^19 = 1162261467.",
    "Epoch 1732269600 is 2024-11-22T10:00:00Z; timestamp 1700000000 and 2024-11-22 10:30:00.",
    "ISBN 0306406152, ISBN 3161484100, ISBN-13 978-0-306-40615-7, https://open.spotify.com/playlist/7504851590.",
    # A phone word, but code or maths between it and the number, or the word too far before it.
    "call f(4000000000) and cell A1 = 2147483647; the phone bill is 12 + 2125550123.",
    "Phone: see the list below, it is long and has no number in it.\n5551234567",
    # A phone word, but no North American number: area code from 0 or 1, or an N11 service code.
    "call 1234567890 or 0123456789; phone 9115550123 or 2129115550.",
    # Shaped like a Social Security number but never issued: area 000, 666 or 9xx, group 00, serial 0000.
    "Not issued: 000-12-3456, 666-12-3456, 900-12-3456, 123-00-4567, 123-45-0000.",
    # Within a longer run of digit groups.
    "Runs: 1 123 45 6789, 123-45-6789-0, 12-123-45-6789, 123-45-67890, 123 45 6789 12.",
    # Lower case: a bad check digit, an unknown country, a gene variant.
    "gb00 west 1234 5698 7654 32 has a wrong check digit; ab12 cdef ghij klmn opqr stuv; the rs12913832 variant.",
    # An @ after CJK text that is a user name, no address.
    "回复@张三.你好，转发@用户名：内容",
])
def test_look_alikes_of_ssns_bare_phones_and_lower_case_ibans_are_left_alone(redactor, text):
    assert redact(redactor, text) == (text, {})


@settings(max_examples=150, deadline=None)
@given(area=st.integers(min_value=1, max_value=899).filter(lambda a: a != 666), group=st.integers(1, 99),
       serial=st.integers(1, 9999), sep=st.sampled_from(["-", " "]))
def test_every_issued_social_security_number_is_replaced(redactor, area, group, serial, sep):
    text = f"SSN {area:03d}{sep}{group:02d}{sep}{serial:04d}."
    assert redact(redactor, text) == ("SSN [SSN].", {"SSN": 1})


@settings(max_examples=150, deadline=None)
@given(n=st.integers(min_value=2_000_000_000, max_value=9_999_999_999))
def test_a_bare_ten_digit_number_without_a_phone_word_is_left_alone(redactor, n):
    text = f"The answer is {n}."
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text, expected", [
    ("my ip is 10.0.0.1", "my ip is [IP_ADDRESS]"),  # 5 digits in all
    ("client 8.8.8.8", "client [IP_ADDRESS]"),
    ("dns 1.1.1.1 ok", "dns [IP_ADDRESS] ok"),
    ("from 10.0.0.12.", "from [IP_ADDRESS]."),
])
def test_an_ipv4_address_is_found_in_a_text_with_few_digits(redactor, text, expected):
    assert redact(redactor, text) == (expected, {"IP_ADDRESS": 1})


def test_ipv4_addresses_in_metadata_values_are_redacted(redactor):
    counts: dict[str, int] = {}
    out = redactor.redact_value({"client.address": "10.20.0.7", "net.peer.ip": "1.1.1.1", "port": "443"}, counts)
    assert out == {"client.address": "[IP_ADDRESS]", "net.peer.ip": "[IP_ADDRESS]", "port": "443"}
    assert counts == {"IP_ADDRESS": 2}


@pytest.mark.parametrize("text", [
    "In 2011-2022 sales grew 3.14159% to $1,234,567.89 for 1,000,000 people.",
    "Call 911 or dial 112. The meeting is at 12:30 on 2023-01-15.",
    "Order 1234567890123 shipped; tracking 4111 1111 1111 1112.",  # 13 digits but no separators; bad Luhn
    "Python 3.11.4 and version 1.2.3.4.5; 10.0.0.256 is not an address.",
    "std::vector<int> and a::b::c, then C++ namespaces like foo::bar.",
    "The IBAN GB00 WEST 1234 5698 7654 32 has a wrong check digit.",
    "task-abcdefghijklmnopqrstuvwxyz is a slug, not a key; sketch-book too.",
    "A budget of 2 000 000 000 EUR, 8 000 000 000 people, 1 000 000 000 000 stars; 1 000 000 and 12 500 000 000.",
    "In C++ call abc::def() or dead::beef, in Rust a::b, be::ef and add::c; Haskell says f :: Int.",
    "Python slices: a[1::2], a[::2], x[d::2], a[::-1] and numpy arr[:, ::2] or arr[:, 1::3].",
    "On 2026-11-24 at 10:30:00 we shipped v1.2.3 (ISBN 978-3-16-148410-0, ISBN 0-306-40615-2) for 06 12 EUR.",
    "Order ORD-0612345678, ref 0612345678; runs 06 12 34 56 78 90, 123406 12 34 56 78, 01 02 03 04 05 06.",
    "Not phones either: 21-800-555-0100, 1-800-555-01000, 1.800.555.0100.5 and 00 12 34 56 78.",
    "Amounts with dots are not addresses: 2.000.000.000 EUR, 1.200.000.000 people, 7.050.000.000 stars.",
    "Luhn-valid but no card: date 20240315103000, ts 1732269600000, ts_ns 1795255200000000002.",
    "Zero-padded ids are no calls abroad: id 000000123456, ref 0012345678, pairs 00 12 34 56 78.",
    "The secret commit 4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b is a hex SHA-1, not an AWS key.",
    "Each token is a word piece; Basic reasoning and the Token class are no credentials.",
    "Mail goes to user@localhost or @handle; pip install pkg@git+https://x; npm i @scope/pkg@1.2.3.",
])
def test_look_alikes_are_left_alone(redactor, text):
    assert redact(redactor, text) == (text, {})


def test_several_findings_in_one_text_are_all_counted(redactor):
    text, counts = redact(redactor, "a@b.io, c@d.org; call +1 415 555 0100; from 10.1.2.3 and 10.1.2.4")
    assert text == "[EMAIL], [EMAIL]; call [PHONE]; from [IP_ADDRESS] and [IP_ADDRESS]"
    assert counts == {"EMAIL": 2, "PHONE": 1, "IP_ADDRESS": 2}


def test_new_formats_are_replaced_whole_next_to_punctuation_and_other_kinds(redactor):
    text, counts = redact(redactor, "Ping 192.168.0.1, fe80::1. or http://[::1]:8080/ then call 1 (800) 555-0100 "
                                    "(or 06.12.34.56.78).")
    assert text == "Ping [IP_ADDRESS], [IP_ADDRESS]. or http://[[IP_ADDRESS]]:8080/ then call [PHONE] (or [PHONE])."
    assert counts == {"IP_ADDRESS": 3, "PHONE": 2}


def test_an_earlier_detector_wins_an_overlap(redactor):
    # The key contains a digit run a phone or card detector could claim; it is redacted whole as a key.
    text, counts = redact(redactor, "key sk-live-4111111111111111abcdefgh end")
    assert text == "key [API_KEY] end" and counts == {"API_KEY": 1}


def test_json_values_are_redacted_deeply_and_credential_keys_whole(redactor):
    counts: dict[str, int] = {}
    value = {"messages": [{"role": "user", "content": [{"type": "text", "text": "mail me: x@y.com"}]}],
             "user_api_key": "88dc28d0f030c55e", "headers": {"Authorization": "Basic dXNlcjpwYXNz"},
             "n": 3, "ok": True, "none": None}
    out = redactor.redact_value(value, counts)
    assert out["messages"][0]["content"][0]["text"] == "mail me: [EMAIL]"
    assert out["user_api_key"] == "[SECRET]" and out["headers"]["Authorization"] == "[SECRET]"
    assert (out["n"], out["ok"], out["none"]) == (3, True, None)
    assert counts == {"EMAIL": 1, "SECRET": 2}
    assert value["messages"][0]["content"][0]["text"] == "mail me: x@y.com"  # the input is not modified


@pytest.mark.parametrize("key", ["token", "api_token", "id_token", "x-api-token", "X-Api-Token", "GITHUB_TOKEN",
                                 "apiToken", "pwd", "db_pwd", "credentials", "aws_credential", "passphrase"])
def test_values_under_token_password_and_credential_keys_are_secrets(redactor, key):
    counts: dict[str, int] = {}
    assert redactor.redact_value({key: "a1b2c3d4e5f6g7h8"}, counts) == {key: "[SECRET]"} and counts == {"SECRET": 1}


def test_logprobs_and_special_tokens_are_not_secrets_but_a_token_key_with_a_credential_is(redactor):
    value = {"logprobs": {"content": [{"token": " Hello", "logprob": -0.1, "top_logprobs": [{"token": "Hi"}]}]},
             "eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>"}
    counts: dict[str, int] = {}
    assert redactor.redact_value(value, counts) == value and counts == {}
    assert redactor.redact_value({"token": "a1b2c3d4e5f6g7h8"}, counts) == {"token": "[SECRET]"}


def test_token_counts_of_llm_requests_are_not_secrets(redactor):
    value = {"params": {"max_tokens": 256, "max_completion_tokens": 512, "maxTokens": 64},
             "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "tokens": [1, 2],
                       "token_count": 12, "num_tokens": 3, "cached_tokens": 0, "tokenizer": "cl100k_base"}}
    counts: dict[str, int] = {}
    assert redactor.redact_value(value, counts) == value and counts == {}


def test_a_credential_is_replaced_whatever_its_type_and_short_emails_are_found(redactor):
    counts: dict[str, int] = {}
    value = {"password": 123456, "api_key": ["myplainkey123"], "authorization": {"value": "opaque-token-xyz"},
             "secret": None, "api-key": "", "has_password": False, "contact": "a@b.co"}
    out = redactor.redact_value(value, counts)
    assert out["password"] == out["api_key"] == out["authorization"] == "[SECRET]"
    assert (out["secret"], out["api-key"], out["has_password"]) == (None, "", False)  # nothing to hide
    assert out["contact"] == "[EMAIL]" and counts == {"SECRET": 3, "EMAIL": 1}


def test_cached_results_still_count(redactor):
    first = redact(redactor, "System: escalate to help@corp.example.com")
    second = redact(redactor, "System: escalate to help@corp.example.com")
    assert first == second == ("System: escalate to [EMAIL]", {"EMAIL": 1})


def test_disabled_redaction_changes_nothing():
    off = Redactor.from_config(RedactionConfig(enabled=False))
    counts: dict[str, int] = {}
    assert off.redact("a@b.io", counts) == "a@b.io" and counts == {}
    assert off.redact_value({"api_key": "sk-x"}, counts) == {"api_key": "sk-x"}


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB82 WEST 1234 5698 7654 33")
    assert not iban_valid("GB82") and not iban_valid("GB82 WEST 1234 5698 7654 32 " + "1" * 30)


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ,.!?", min_size=0, max_size=60)
emails = st.builds(lambda u, d: f"{u}@{d}.com", st.from_regex(r"[a-z][a-z0-9._]{0,10}", fullmatch=True),
                   st.from_regex(r"[a-z]{2,10}", fullmatch=True))
cards = st.sampled_from(["4111111111111111", "4012 8888 8888 1881", "5555-5555-5555-4444", "6011111111111117"])


@settings(max_examples=150, deadline=None)
@given(before=words, after=words, email=emails, card=cards)
def test_pii_embedded_in_any_text_never_survives(redactor, before, after, email, card):
    text, counts = redact(redactor, f"{before} {email} {after} {card} {before}")
    assert email not in text and card not in text
    assert counts.get("EMAIL") == 1 and counts.get("CARD_NUMBER") == 1


@settings(max_examples=150, deadline=None)
@given(n=st.integers(min_value=1_000, max_value=10**12 - 1), sep=st.sampled_from([" ", ","]), before=words,
       after=words)
@example(n=2_000_000_000, sep=" ", before="a budget of", after="euros")
@example(n=12_500_000_000, sep=" ", before="", after="")
def test_amounts_grouped_by_thousands_are_never_phones(redactor, n, sep, before, after):
    amount = f"{n:,}".replace(",", sep)
    text = f"{before} {amount} {after}"
    assert redact(redactor, text) == (text, {})


@settings(max_examples=150, deadline=None)
@given(ms=st.integers(min_value=1_500_000_000_000, max_value=1_999_999_999_999), scale=st.sampled_from([1, 10**6]))
@example(ms=1_732_269_600_000, scale=1)  # passes Luhn
def test_epoch_timestamps_are_never_card_numbers(redactor, ms, scale):
    text = f"created_at: {ms * scale}"  # epoch milliseconds (13 digits) or nanoseconds (19)
    assert redact(redactor, text) == (text, {})


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_redaction_never_fails_and_text_without_findings_is_unchanged(redactor, text):
    out, counts = redact(redactor, text)
    if not counts:
        assert out == text
    assert sum(counts.values()) == sum(out.count(f"[{kind}]") - text.count(f"[{kind}]") for kind in counts)


@pytest.mark.parametrize("text", ["Pay with my card 2200000000000004 please",  # Mir
                                  "card 8100000000000002 thanks",  # RuPay
                                  "card 9792000000000003 (Troy)",
                                  "card 1234 5678 9012 3452 thanks"])  # grouped like a card: one, whatever its IIN
def test_cards_of_every_network_are_replaced(redactor, text):
    out, counts = redact(redactor, text)
    assert counts == {"CARD_NUMBER": 1} and "[CARD_NUMBER]" in out


@pytest.mark.parametrize("text", ["ISBN: 978-1878125026",  # both found in AlpacaEval answers as card numbers
                                  "0010: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00",
                                  "ISBN 979-10-90636-07-1"])
def test_a_luhn_valid_number_grouped_unlike_a_card_and_starting_like_none_is_left(redactor, text):
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text", ["card 3782 822463 10005", "card 3056 930902 5904", "card 1234-5678-9012-3452"])
def test_numbers_grouped_as_cards_are_printed_are_replaced(redactor, text):
    assert redact(redactor, text)[1] == {"CARD_NUMBER": 1}


def test_a_local_part_is_read_at_most_128_characters_back_from_the_at(redactor):
    """Bounded so that runs like `a..a..a..` are not rescanned (quadratic: 4 s for 24k characters); RFC 5321 allows
    64 characters, and a CJK run is taken whole up to 256. A longer run loses its last 128 characters."""
    assert redact(redactor, "mail x..y@example.com")[0] == "mail [EMAIL]"
    assert redact(redactor, "mail " + "a" * 128 + "@example.com")[0] == "mail [EMAIL]"
    assert redact(redactor, "mail " + "a" * 129 + "@example.com")[0] == "mail a[EMAIL]"
    assert redact(redactor, "mail " + "用" * 256 + "@例子.公司")[0] == "mail [EMAIL]"
    assert redact(redactor, "mail " + "用" * 257 + "@例子.公司")[0] == "mail 用[EMAIL]"
    junk = "a.." * 8000 + "a@example.com"
    out, counts = redact(redactor, junk)
    assert counts == {"EMAIL": 1} and out.endswith("a..[EMAIL]") and len(out) < len(junk)


@pytest.mark.parametrize("text, expected", [
    ("IBAN DE89 3704 0044 0532 0130 00 or GB82 WEST 1234 5698 7654 32", "IBAN [IBAN] or [IBAN]"),
    ("Pay DE89370400440532013000 or GB82 WEST 1234 5698 7654 32 please", "Pay [IBAN] or [IBAN] please"),
    ("GB82 WEST 1234 5698 7654 32 GB82 WEST 1234 5698 7654 32", "[IBAN] [IBAN]"),
])
def test_an_iban_after_another_in_the_same_sentence_is_replaced_too(redactor, text, expected):
    """The IBAN regex runs on over lower-case words into the next IBAN; the first is cut to its country's length,
    and the search goes on from its end, not from the end of the match."""
    assert redact(redactor, text) == (expected, {"IBAN": 2})


@pytest.mark.parametrize("text, expected", [
    ("\u2709\ufe0fjohn.doe@gmail.com", "\u2709\ufe0f[EMAIL]"),  # an emoji's variation selector
    ("\u30a2\u30c9\u30ec\u30b9\u304b\u3099taro@example.jp",  # NFD kana: か + the combining voiced mark
     "\u30a2\u30c9\u30ec\u30b9\u304b\u3099[EMAIL]"),
    ("jose\u0301.garcia@example.com", "[EMAIL]"),  # a mark inside the local part still belongs to it
])
def test_an_address_right_after_a_combining_mark_is_replaced(redactor, text, expected):
    assert redact(redactor, text) == (expected, {"EMAIL": 1})


def test_an_address_after_a_run_longer_than_a_local_part_is_replaced(redactor):
    """A URL-encoded query parameter: one run of local-part characters of about 190 before the @."""
    url = "https://t.example.com/c?u=" + "%2F".join(["seg%3Dabc"] * 15) + "%26email%3Djohn.doe@gmail.com"
    out, counts = redact(redactor, url)
    assert counts == {"EMAIL": 1} and "john.doe" not in out and out.endswith("[EMAIL]")


@pytest.mark.parametrize("text", [
    "Please tell me whether 2147483647 is prime.",
    "The telescope cost 2500000000 dollars.",
    "The iPhone sold 2300000000 units",
    "calls per day: 3000000000",
    "the called function returned 4000000000",
    "Contact id 8005550199",
    "text me later; order #8005550199",
    "Excel cell B holds 2147483647",
    "SMS gateway processed 2500000000 messages",
])
def test_a_phone_word_counts_only_as_a_whole_word_before_a_bare_number(redactor, text):
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text, expected", [
    ("Phone: 5551234567, 5559876543", "Phone: [PHONE], [PHONE]"),
    ("call me at 5551234567 or 5559876543", "call me at [PHONE] or [PHONE]"),
    ("Call 5551234567", "Call [PHONE]"),
    ("Tel: 5551234567", "Tel: [PHONE]"),
    ("My cell is 5551234567", "My cell is [PHONE]"),
    ("cell: 5551234567 or 5559876543", "cell: [PHONE] or [PHONE]"),
    ("SMS to 5551234567", "SMS to [PHONE]"),
])
def test_bare_phone_numbers_after_a_phone_word_are_replaced(redactor, text, expected):
    assert redact(redactor, text)[0] == expected


@pytest.mark.parametrize("text", ["Lot sizes: 450 25 1200 and 300 40 8000", "Game scores 123 45 6789",
                                  "Results in 100 12 1000 are 200 34 5678"])
def test_numbers_grouped_3_2_4_by_spaces_without_an_ssn_word_are_left_alone(redactor, text):
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text, expected", [
    ("ssn=123 45 6789", "ssn=[SSN]"),
    ("Social Security number: 123 45 6789.", "Social Security number: [SSN]."),
    ("SSN 123-45-6789 2 dependents", "SSN [SSN] 2 dependents"),
    ("Note: 123-45-6789, thanks.", "Note: [SSN], thanks."),
])
def test_an_ssn_with_dashes_or_spaced_after_an_ssn_word_is_replaced(redactor, text, expected):
    assert redact(redactor, text) == (expected, {"SSN": 1})


@pytest.mark.parametrize("text, expected", [
    ("123-45-6789, " * 3000, "[SSN], " * 3000),
    ("a@b.co " * 3000, "[EMAIL] " * 3000),
])
def test_thousands_of_findings_in_one_text_are_all_replaced(redactor, text, expected):
    assert redact(redactor, text)[0] == expected


def test_overlapping_findings_go_to_the_earlier_detector_then_the_earlier_start():
    spans = [(5, 9, 1, "B"), (0, 6, 0, "A"), (8, 12, 0, "A"), (10, 14, 1, "B"), (14, 16, 1, "B"), (12, 13, 2, "C")]
    kept = redaction._winners(spans)
    assert redaction._replace("x" * 20, "x" * 20, kept, [])[0] == "[A]xx[A][C]x[B]xxxx"
    assert [span[3] for span in kept] == ["A", "A", "C", "B"]


def _kept_one_by_one(spans):
    """The rule as first written: by priority then start, each kept if it overlaps none kept before it."""
    kept = []
    for span in sorted(spans, key=lambda s: (s[2], s[0])):
        if all(span[1] <= k[0] or span[0] >= k[1] for k in kept):
            kept.append(span)
    return sorted(kept)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8), st.integers(0, 3)), max_size=25, unique=True))
def test_the_findings_kept_are_those_kept_one_by_one(found):
    spans = [(start, start + length, priority, "ABCD"[priority]) for start, length, priority in found]
    text = "x" * 50
    kept = _kept_one_by_one(spans)
    expected = "".join(text[prev[1] if prev else 0:span[0]] + f"[{span[3]}]"
                       for prev, span in zip([None] + kept[:-1], kept)) + text[kept[-1][1] if kept else 0:]
    assert redaction._replace(text, text, redaction._winners(list(spans)), [])[0] == expected


def test_an_extra_pattern_that_matches_nothing_inserts_no_placeholder():
    redactor = Redactor.from_config(RedactionConfig(extra_patterns={"order": r"ORD-\d*|\d*"}))
    assert redact(redactor, "see ORD-12 now") == ("see [ORDER] now", {"ORDER": 1})


def test_crafted_cjk_runs_before_an_at_find_nothing_and_leave_the_text(redactor):
    text = (("\u7528.." * 85) + "\u7528@" + "b." * 2000 + " ") * 3
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text, expected", [
    ("Phone 2: 4155550100", "Phone 2: [PHONE]"),  # a label's number after the word
    ("Tel. (US) 4155550100", "Tel. (US) [PHONE]"),  # an aside in brackets
    ("Phone:\n4155550100", "Phone:\n[PHONE]"),  # a form's value on the next line
    ("Phone: you can reach me during office hours on weekdays at 4155550100", "Phone: you can reach me during "
     "office hours on weekdays at [PHONE]"),  # the word 63 characters before, in the same sentence
    ("Contact Dr. Smith at the front desk of the main building, 4155550100.",
     "Contact Dr. Smith at the front desk of the main building, [PHONE]."),
])
def test_a_bare_phone_number_later_in_the_phone_words_sentence_is_replaced(redactor, text, expected):
    assert redact(redactor, text) == (expected, {"PHONE": 1})


@pytest.mark.parametrize("text", [
    "Phone: see the list below. It has 2147483647 entries.",  # another sentence
    "Phone support\nwas rated 4155550100 times",  # another line, past the label
    "call f(x) 4000000000 times; call print(4155550100)",  # code: brackets glued to a name, or around the number
    "Phone: you can reach me during office hours on weekdays, or on some weekends too, at 4155550100",  # too far
    "Phone 2 is 2147483647",  # a number after the word that is no label
])
def test_a_bare_ten_digit_number_outside_the_phone_words_sentence_is_left_alone(redactor, text):
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text, expected, kind", [
    ("ｊｏｈｎ＠example.com", "[EMAIL]", "EMAIL"),
    ("mail john＠example.com now", "mail [EMAIL] now", "EMAIL"),
    ("请联系ｊｏｈｎ＠ｅｘａｍｐｌｅ．ｃｏｍ获取帮助", "请联系[EMAIL]获取帮助", "EMAIL"),
    ("電話：０９０－１２３４－５６７８です", "電話：[PHONE]です", "PHONE"),
    ("Tel：４１５-５５５-０１００", "Tel：[PHONE]", "PHONE"),
    ("カード ４１１１ １１１１ １１１１ １１１１ で", "カード [CARD_NUMBER] で", "CARD_NUMBER"),
])
def test_full_width_forms_of_pii_are_replaced(redactor, text, expected, kind):
    assert redact(redactor, text) == (expected, {kind: 1})


def test_full_width_text_without_pii_is_left_alone(redactor):
    text = "２０２４年１１月２２日、価格は１，２３４円です。（ＡＢＣ）"
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text, expected", [
    ("張.wei@example.com", "[EMAIL]"),  # a CJK letter joined by a dot to a Latin local part belongs to it
    ("mail 張.wei@example.com now", "mail [EMAIL] now"),
    ("wei.張@example.cn", "[EMAIL]"),
    # CJK top-level domains outside the known list: the IDN test ones, and any of 2-4 letters that plainly ends,
    # after a local part that is not all CJK.
    ("user@例子.测试", "[EMAIL]"),
    ("user@例え.テスト", "[EMAIL]"),
    ("mail user@例子.样本。", "mail [EMAIL]。"),
    ("user@例子.测试获取帮助", "[EMAIL]获取帮助"),  # a known test domain ends where it is known to
])
def test_addresses_mixing_cjk_and_latin_or_with_an_unlisted_cjk_domain_are_replaced(redactor, text, expected):
    assert redact(redactor, text) == (expected, {"EMAIL": 1})


@pytest.mark.parametrize("text", [
    "转发用户@张三.你好，谢谢",  # a CJK user name after @ with an all-CJK "local part": a mention
    "user@例子.样本获取帮助",  # an unlisted domain glued to the sentence: where it ends is guesswork
])
def test_an_unlisted_cjk_domain_is_no_address_after_a_cjk_name_or_without_a_plain_end(redactor, text):
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text, expected", [
    ("SSN 123456789", "SSN [SSN]"),
    ("social security number: 123456789.", "social security number: [SSN]."),
    ("ssn=078051120, dob 1970", "ssn=[SSN], dob 1970"),
])
def test_a_bare_nine_digit_ssn_after_an_ssn_word_is_replaced(redactor, text, expected):
    assert redact(redactor, text) == (expected, {"SSN": 1})


@settings(max_examples=150, deadline=None)
@given(n=st.integers(min_value=100_000_000, max_value=899_999_999), before=words, after=words)
def test_a_bare_nine_digit_number_without_an_ssn_word_is_left_alone(redactor, n, before, after):
    text = f"{before} {n} {after}"
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text", [
    "Part no. 123-45-6789", "Catalogue number: 123-45-6789", "Order #123-45-6789 shipped", "Model 123-45-6789",
    "Serial No. 123-45-6789", "SKU: 123-45-6789", "Cat. No. 123-45-6789", "Part nos. 123-45-6789, 234-56-7890",
])
def test_a_dashed_3_2_4_number_after_a_part_or_order_label_is_left_alone(redactor, text):
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text, expected", [
    ("SSN for the order 123-45-6789", "SSN for the order [SSN]"),  # an SSN word comes before the label
    ("My SSN (not part no.) 123-45-6789", "My SSN (not part no.) [SSN]"),
    ("The part shipped to John, 123-45-6789", "The part shipped to John, [SSN]"),  # a part word, but no label
])
def test_a_dashed_ssn_after_an_ssn_word_or_not_right_after_a_label_is_replaced(redactor, text, expected):
    assert redact(redactor, text) == (expected, {"SSN": 1})


FIXTURES = Path(__file__).parent / "fixtures" / "traffic"
SEEDED_PII: dict[str, list[str]] = json.loads((FIXTURES / "pii.json").read_text())


@pytest.mark.parametrize("kind, value", [(kind, value) for kind, values in SEEDED_PII.items() for value in values])
def test_every_value_seeded_in_the_traffic_fixtures_is_replaced_as_its_kind(redactor, kind, value):
    out, counts = redact(redactor, f"Note: {value}, thanks.")
    if kind == "BEARER_TOKEN":  # the scheme word is kept
        assert out == "Note: Bearer [BEARER_TOKEN], thanks." and counts == {kind: 1}
    else:
        assert (out, counts) == (f"Note: [{kind}], thanks.", {kind: 1})


@pytest.mark.parametrize("text, expected", [
    ("john@example.com+14155550100", "[EMAIL][PHONE]"),
    ("a@b.co4111111111111111", "[EMAIL][CARD_NUMBER]"),
    ("mail x@y.com123-45-6789 now", "mail [EMAIL][SSN] now"),
])
def test_pii_glued_to_an_address_is_replaced_in_the_same_call(redactor, text, expected):
    assert redact(redactor, text)[0] == expected


def _fixture_texts() -> list[str]:
    """Every string in the traffic fixtures' records (gateway logs, OTel exports, LiteLLM rows)."""
    def strings(value) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return []

    lines = gzip.decompress((FIXTURES / "gateway" / "2026-11-21.jsonl.gz").read_bytes()).decode().splitlines()
    for name in ("gateway/2026-11-22.jsonl", "otel/export.jsonl", "litellm_spend_logs.jsonl"):
        lines += (FIXTURES / name).read_text().splitlines()
    return sorted({s for line in lines for s in strings(json.loads(line)) if len(s) >= 6})


GLUE = ["", " ", "+", ".", "-", "/", ",", ":", "(", ")", "@", "_", "\n", "，", "＠"]
PII_PIECES = [v for values in SEEDED_PII.values() for v in values] + [
    "123456789", "SSN", "Phone", "4155550100", "張", "wei", "例子.测试", "ｊｏｈｎ＠example.com", "Part no.",
    "fe80::1", "10.0.0.1", "john", "example.com", "123 45 6789", "１２３", "0612345678"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PII_PIECES), st.sampled_from(GLUE)), min_size=1, max_size=6))
def test_redacting_twice_changes_nothing_more_where_pii_is_glued_to_pii(redactor, pieces):
    text = "".join(piece + glue for piece, glue in pieces)
    once, _ = redact(redactor, text)
    assert redact(redactor, once) == (once, {})


def test_redacting_the_fixture_texts_twice_changes_nothing_more(redactor):
    texts = _fixture_texts()
    assert len(texts) > 100
    for text in texts:
        once, _ = redact(redactor, text)
        assert redact(redactor, once) == (once, {}), text


@pytest.mark.parametrize("text, expected", [
    ("SSN 123456789 123456789 123456789 123456789 123456789", "SSN [SSN] 123456789 123456789 123456789 123456789"),
    ("Phone: [PHONE] 4155550100 and SSN [SSN] 123 45 6789", "Phone: [PHONE] 4155550100 and SSN [SSN] 123 45 6789"),
])
def test_a_placeholder_is_no_context_word_and_ends_the_words_reach(redactor, text, expected):
    """Only the number right after an SSN word is one; a placeholder left by an earlier pass does not carry the word
    on to the next number of the list, nor act as a phone or SSN word itself."""
    assert redact(redactor, text)[0] == expected


def test_a_configured_pattern_never_replaces_a_placeholder_so_redacting_twice_changes_nothing():
    redactor = Redactor.from_config(RedactionConfig(extra_patterns={"constant": r"\b[A-Z][A-Z_]{4,}\b"}))
    once = redact(redactor, "see MAX_RETRIES and sk-proj-abcdefghijklmnopqrstuvwxyz012345, mail a@b.co")
    assert once == ("see [CONSTANT] and [API_KEY], mail [EMAIL]", {"CONSTANT": 1, "API_KEY": 1, "EMAIL": 1})
    assert redact(redactor, once[0]) == (once[0], {})


def _backtracking_loops(pattern: str) -> list[str]:
    """The repetitions of `pattern` that may give back what they matched (greedy or lazy) and either have no bound
    or repeat a group: where a failing match tries every way of splitting the text between them, exponentially
    many when the pieces overlap. Look-arounds are skipped (each is tried once per position)."""
    import re._parser as parser
    from re._constants import MAXREPEAT

    found: list[str] = []

    def walk(items) -> None:
        for op, arg in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT"):
                _, most, body = arg
                if most == MAXREPEAT or any(str(inner) in ("BRANCH", "SUBPATTERN", "MAX_REPEAT", "MIN_REPEAT",
                                                           "POSSESSIVE_REPEAT") for inner, _ in body):
                    found.append(str(body)[:80])
                walk(body)
            elif name == "POSSESSIVE_REPEAT":
                walk(arg[2])
            elif name == "SUBPATTERN":
                walk(arg[-1])
            elif name == "BRANCH":
                for branch in arg[1]:
                    walk(branch)
            elif name == "ATOMIC_GROUP":
                walk(arg)

    walk(parser.parse(pattern))
    return found


@pytest.mark.parametrize("name", ["_PHONE_CONTEXT", "_PHONE_CONTEXT_NEXT_LINE", "_SSN_CONTEXT", "_SSN_BARE_CONTEXT",
                                  "_PART_NUMBER_LABEL", "_NAMED_NUMBER"])
def test_the_patterns_searched_before_every_candidate_never_backtrack_into_a_loop(name):
    """They run before every candidate number, on text anyone can send: `phone no.no.no...#4155550123` took 32 s in
    one call while a full stop could be read two ways. Possessive loops fail in one pass over the window."""
    assert _backtracking_loops(getattr(redaction, name).pattern) == []


@pytest.mark.parametrize("text", [
    ("phone " + "no." * 24 + "#4155550123\n") * 40,  # 2^24 readings of the full stops each, had they two
    ("call " + "dr.st." * 12 + ";4155550123\n") * 40,
    ("phone" + ":" * 36 + " ." * 18 + "#4155550123\n") * 40,
    ("tel " + "(ab " * 18 + "4155550123\n") * 40,
    ("SSN" + " ." * 18 + ";123 45 6789\n") * 40,
])
def test_crafted_runs_before_a_number_are_read_in_one_pass(redactor, text):
    """Each number's window holds its word and a run no phone's or SSN's context reads through: one pass over it
    takes microseconds, where two readings of each full stop took 32 s per number (the run of pytest would not
    end). The numbers stay, as no context reaches them."""
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text, expected", [
    ("[Phone] 4155550123", "[Phone] [PHONE]"),  # a label in brackets is a word like any other
    ("[phone]: 4155550123", "[phone]: [PHONE]"),
    ("Contact details:\n[Mobile] 2125551234\n[Email] none", "Contact details:\n[Mobile] [PHONE]\n[Email] none"),
    ("SSN [required]: 123 45 6789", "SSN [required]: [SSN]"),
    ("**[Ssn](#ssn)**: 123 45 6789", "**[Ssn](#ssn)**: [SSN]"),
    ("Item: 123-45-6789 is my social", "Item: [SSN] is my social"),  # a form's field, no item number label
    ("Please call me. 4155550123", "Please call me. [PHONE]"),  # the number starts the next sentence
    ("Call me! 4155550123", "Call me! [PHONE]"),
    ("You can call me at\n4155550123", "You can call me at\n[PHONE]"),
])
def test_a_bracketed_word_or_a_number_right_after_the_words_sentence_still_counts(redactor, text, expected):
    assert redact(redactor, text)[0] == expected


@pytest.mark.parametrize("text", [
    "Item #123-45-6789 shipped", "Item no. 123-45-6789",  # an item's number label is a label
    "Phone: see the list below, it is long and has no number in it.\n5551234567",  # past the next line's reach
])
def test_an_item_number_label_or_a_far_sentence_is_still_no_context(redactor, text):
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text", [
    "My phone died last week, so I could not confirm the refund for order 2125551234 in time.",
    "I called support from my phone yesterday and they said my account number is 4155550123, is that right?",
    "Call of Duty: Modern Warfare III sold roughly 3105551234 hours of playtime in its first month, per the report.",
    "Please call back tomorrow about the refund status of your recent purchase, invoice 6465550199.",
    "The SSA processed 412345678 claims last year, according to the annual report.",
])
def test_a_number_named_as_another_kind_or_counting_something_is_no_phone_or_ssn(redactor, text):
    assert redact(redactor, text) == (text, {})


@pytest.mark.parametrize("text, expected", [
    ("Call my account manager at 4155550123.", "Call my account manager at [PHONE]."),
    ("Please call the reservations desk at 4155550123.", "Please call the reservations desk at [PHONE]."),
    ("Phone the booking office on 4155550123", "Phone the booking office on [PHONE]"),
    ("Contact our accounts team at 4155550123", "Contact our accounts team at [PHONE]"),
    ("Text me about my order at 4155550123", "Text me about my order at [PHONE]"),
    ("Call the ticket office at 4155550123", "Call the ticket office at [PHONE]"),
    ("Call the insurance policy holder, Mrs. Lee, at 4155550123", "Call the insurance policy holder, Mrs. Lee, at "
     "[PHONE]"),
    ("Phone me: it costs nothing: 4155550123", "Phone me: it costs nothing: [PHONE]"),
    ("Call me about order 2125551234 at 4155550123", "Call me about order 2125551234 at [PHONE]"),
    ("Call me at 4155550123 days, 4155550199 evenings.", "Call me at [PHONE] days, [PHONE] evenings."),
    ("Call me 4155550123 times two", "Call me [PHONE] times two"),
    ("Phone: 4155550123 Hours: 9-5", "Phone: [PHONE] Hours: 9-5"),  # the next field's label, no count
    ("Tel 4155550123 Hours 9-5", "Tel [PHONE] Hours 9-5"),
])
def test_a_word_naming_another_number_ends_a_phone_words_reach_only_right_before_the_number(redactor, text,
                                                                                              expected):
    """`account`, `order`, `costs` ... anywhere in the sentence left real phone numbers in clear; only right
    before the number, alone or with a number word or sign, do they name it."""
    assert redact(redactor, text)[0] == expected


@pytest.mark.parametrize("text", [
    "Call me about order number 2125551234", "Call about invoice #6465550199", "Phone re account: 4155550123",
    "Call them, my account no. is 4155550123", "Contact id 4155550123", "Call: sold approx. 3105551234",
    "Call of Duty sold 3105551234 copies", "Call of Duty sold 3105551234 HOURS",
])
def test_a_number_named_right_before_it_or_counting_something_is_still_no_phone(redactor, text):
    assert redact(redactor, text) == (text, {})


def test_a_placeholder_written_by_the_redactor_is_no_word_but_other_brackets_are(redactor):
    """`[PHONE]` and `[SSN]` as the redactor writes them (case and all) end a word's reach; `[Phone]` does not."""
    assert redact(redactor, "[PHONE] 4155550123")[1] == {}
    assert redact(redactor, "SSN [EMAIL] 123 45 6789")[1] == {}
    assert redact(redactor, "[Phone] 4155550123")[1] == {"PHONE": 1}


GLUED_CHAIN_PIECES = ["john@example.com", "x@y.co", "+14155550100", "4111111111111111", "123-45-6789", "10.0.0.1",
                      "sk-abcdefghijklmnopqrstuvwx", "4155550123", "a@b.io", "ghp_" + "a" * 36, "AKIAABCDEFGHIJKLMNOP",
                      "x@a.中文字符", "DE89370400440532013000", "fe80::1", "123 45 6789", "SSN ", "phone "]


def _redact_with_whole_passes(redactor: Redactor, text: str, monkeypatch) -> tuple[str, dict[str, int]]:
    """Redaction whose every later pass reads the whole text again, not only around what the pass before replaced."""
    with monkeypatch.context() as patched:
        patched.setattr(redaction, "_rescan_regions", lambda text, spans, kept: [(-1, 10 ** 9, 0, "")])
        return redact(redactor, text)


@pytest.mark.parametrize("text", [
    "john@example.com+14155550100AKIAABCDEFGHIJKLMNOP+14155550100ghp_" + "a" * 36,
    "a@b.io4111111111111111sk-abcdefghijklmnopqrstuvwxjohn@example.com+14155550100ghp_" + "a" * 36
    + "+14155550100AKIAABCDEFGHIJKLMNOP",
    "+14155550100123-45-6789john@example.com4111111111111111x@y.co123-45-6789+14155550100"
    "sk-abcdefghijklmnopqrstuvwx10.0.0.110.0.0.1",
    "ghp_" + "a" * 36 + "AKIAABCDEFGHIJKLMNOPAKIAABCDEFGHIJKLMNOPghp_" + "a" * 36 + "123-45-6789x@y.co",
])
def test_a_glued_chain_is_redacted_whole_in_one_call(redactor, text, monkeypatch):
    """Each finding hides the next from its detector until it is a placeholder: four passes left the fifth in clear."""
    once = redact(redactor, text)
    assert redact(redactor, once[0]) == (once[0], {})
    assert once == _redact_with_whole_passes(Redactor.from_config(RedactionConfig()), text, monkeypatch)


@pytest.mark.parametrize("link, kinds", [
    ("AKIAABCDEFGHIJKLMNOP+14155550100", {"API_KEY": 1, "PHONE": 1}),
    ("x@a.中文字符", {"EMAIL": 1}),  # found from the last one back, each once the one after it is a placeholder
])
def test_thousands_of_findings_each_hidden_by_the_one_before_are_all_replaced(redactor, link, kinds):
    text = link * 1500
    out, counts = redact(redactor, text)
    assert counts == {kind: n * 1500 for kind, n in kinds.items()}
    assert set(out) <= set("".join(f"[{kind}]" for kind in kinds))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(GLUED_CHAIN_PIECES), min_size=2, max_size=10))
def test_later_passes_around_what_was_replaced_find_what_whole_passes_find(pieces):
    text = "".join(pieces)
    redactor = Redactor.from_config(RedactionConfig())
    once = redact(redactor, text)
    assert redact(redactor, once[0]) == (once[0], {})
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(redaction, "_rescan_regions", lambda text, spans, kept: [(-1, 10 ** 9, 0, "")])
        assert redact(Redactor.from_config(RedactionConfig()), text) == once


@pytest.mark.parametrize("text, rescanned", [
    ("mail a@b.co now, or call +1 415 555 0100.", False),  # findings between spaces and punctuation: one pass
    ("(a@b.co) and \"x@y.co\"", False),
    ("john@example.com+14155550100", True),  # glued
    ("call 4155550123 123 45 6789", True),  # a digit one space on, which the look-behind of an SSN sees
])
def test_a_second_pass_runs_only_where_a_finding_touches_other_text(text, rescanned):
    redactor = Redactor.from_config(RedactionConfig())
    spans = redactor._find(text, None)
    assert spans
    assert bool(redaction._rescan_regions(text, spans, redaction._winners(spans))) is rescanned
