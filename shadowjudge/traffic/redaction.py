"""PII redaction applied to every sampled request before anything is written to the store.

Each detector replaces what it finds by a typed placeholder (`[EMAIL]`, `[PHONE]`, ...) and counts it by kind.
Numbers that merely look like card numbers or IBANs are left alone unless their checksum holds (Luhn, mod-97),
so prices, order numbers and years survive; a card number must also start like one of a card network's and have
that network's length, so most ids and timestamps (epoch milliseconds start with 1) that happen to pass Luhn
survive too, and an IBAN in lower case must also have its country's length. A US Social Security number needs its
layout (123-45-6789, but not right after a part, order, model or SKU label; 123 45 6789 and 123456789 only after a
word such as `SSN`) and a number that is issued (not area 000, 666 or 9xx, group 00, serial 0000).
Phones need a recognised layout (international with `+`, `00` or `011`, North American with or without the trunk
code 1, national with a trunk 0, French-style pairs); a bare run of 10 digits only when it is a valid North
American number later in the sentence of a word such as `phone` or `call`, and amounts grouped by thousands
(`2 000 000 000`) are not phones. What parses as an IPv6 address but reads as code is not one: a `word::word`
path made of hex letters (`dead::beef`, `abc::def()`) or a Python slice (`a[1::2]`, `::2`).

Full-width forms (`ｊｏｈｎ＠example.com`, `０９０－１２３４－５６７８`) are read as ASCII. Redaction repeats until a
pass finds nothing (PII glued to PII shows only once its neighbour is a placeholder), so redacting twice changes
nothing more.

Speed matters (every sampled request goes through here), so each detector has a cheap gate (a substring test
in C) and its regex starts with a literal or a character class, which lets `re` skip ahead instead of trying a
match at every position. Detectors run in order: secrets first (they contain digit runs the number detectors
would otherwise claim), then e-mails, then the numeric kinds.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from bisect import bisect_right
from heapq import merge
from itertools import groupby
from operator import itemgetter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shadowjudge.config import RedactionConfig

EMAIL = "EMAIL"
PHONE = "PHONE"
CARD = "CARD_NUMBER"
IBAN = "IBAN"
IP_ADDRESS = "IP_ADDRESS"
API_KEY = "API_KEY"
BEARER_TOKEN = "BEARER_TOKEN"
SECRET = "SECRET"
SSN = "SSN"
BUILTIN_KINDS = (API_KEY, BEARER_TOKEN, EMAIL, IBAN, CARD, SSN, IP_ADDRESS, PHONE, SECRET)

# A JSON value stored under a key named like this is a credential whatever it looks like (e.g. a hashed key).
# `token` counts as the last word of a longer key (`id_token`, `x-api-token`, `apiToken`): `tokens`, `max_tokens`,
# `prompt_tokens` or `token_count` are token counts, found in every LLM request and usage block, and a tokenizer's
# special tokens (`eos_token`) are no secrets. A key that is `token` alone is also a logprobs entry's text
# (`{"token": " Hello"}`): only a credential-shaped value under it is one (BARE_TOKEN_KEY, `credential_shaped`).
SECRET_KEY_NAME = re.compile(r"(?i)api[_-]?key|authorization|passw(?:or)?d|passphrase|secret|credential"
                             r"|access[_-]?token|auth[_-]?token|refresh[_-]?token|session[_-]?token"
                             r"|private[_-]?key|cookie|(?<![a-z])pwd(?![a-z])"
                             r"|(?<!bos_)(?<!eos_)(?<!pad_)(?<!unk_)(?<!sep_)(?<!cls_)(?<!mask_)"
                             r"(?:(?<=[-_. ])token|(?-i:(?<=[a-z])Token))$")
BARE_TOKEN_KEY = re.compile(r"(?i)token")


def credential_shaped(value: Any) -> bool:
    """A string of 16 or more characters without spaces: an opaque token, not a word or a piece of one."""
    return type(value) is str and len(value) >= 16 and not any(ch.isspace() for ch in value)

_API_KEY_PREFIXES = ("sk-", "sk_", "rk_", "pk_", "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
                     "github_pat_", "xox", "AIza", "glpat-", "hf_", "eyJ")
_API_KEY = re.compile(
    r"(?<![A-Za-z0-9_-])(?:sk-(?:proj-|ant-|or-)?[A-Za-z0-9_-]{20,}"  # OpenAI, Anthropic, OpenRouter, generic sk- keys
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|A(?:KIA|SIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"  # JWTs; unsigned ones (`alg: none`) end in `.`
    r")(?![A-Za-z0-9_-])"
)
# An AWS secret access key has no prefix of its own: 40 base64 characters, mixed case (which spares a hex SHA-1),
# taken only when a little after `secret` or `AWS` (`aws_secret_access_key = ...`, `"SecretAccessKey": "..."`, `AWS
# key: ...`; not lowercase `aws`, which is mostly in `laws` and `draws` and would make the gate pass on prose).
# Group 1, the key, is what gets replaced.
_AWS_SECRET_KEY = re.compile(
    r"(?:AWS|[Ss]ecret|SECRET)[\w\s\"':=-]{0,40}?"
    r"(?<![A-Za-z0-9/+])((?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
)
# The credential after an HTTP auth scheme; group 1, the credential, is what gets replaced, the scheme is kept.
# `Basic` and `Token` are ordinary words, so they count only right after an `Authorization` header name.
_BEARER = re.compile(r"(?:[Bb]earer|BEARER"
                     r"|(?:[Aa]uthorization|AUTHORIZATION)[\"']?\s*[:=]\s*[\"']?(?:[Bb]asic|BASIC|[Tt]oken|TOKEN))"
                     r"\s+([A-Za-z0-9._~+/-]{8,}=*)")
# Unicode letters and digits (`müller`, `josé`) and `o'brien`'s apostrophe on the left of the @, Unicode domain
# labels (`bücher.de`, `例え.jp`). The address starts with a letter or digit, so a quote or dot before it stays out.
# Combining marks are part of a word though `\w` leaves them out: text in decomposed form (`josé` as `e` + U+0301)
# and the vowel signs of Indic and Thai scripts (`अनुराग`) would otherwise cut an address in two and leave its first
# half. CJK scripts write no spaces between words, so their letters neither belong to a Latin local part nor end a
# Latin top-level domain: `请联系john@example.com获取帮助` keeps its sentence (`email_local_start`).
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"  # CJK, kana, Hangul, full-width forms


def _combining_marks() -> str:
    """Character-class ranges of the Unicode combining marks (categories Mn, Mc, Me) of the Basic Multilingual
    Plane, none of which `\\w` matches."""
    ranges: list[str] = []
    start = end = -2
    for code in range(0x10000):
        if unicodedata.category(chr(code)).startswith("M"):
            if code != end + 1:
                if start >= 0:
                    ranges.append(f"{chr(start)}-{chr(end)}")
                start = code
            end = code
    ranges.append(f"{chr(start)}-{chr(end)}")
    return "".join(ranges)


_MARKS = _combining_marks()
_EMAIL_WORD = rf"[^\W{_CJK}]"
_TLD_LETTER = rf"[^\W\d_{_CJK}]"
# Top-level domains written in CJK scripts, which end the address wherever the sentence goes on (`例子.公司获取帮助`),
# and the IDN test domains reserved for examples (`测试`, `テスト`, RFC 2606's `.test` in those scripts). Longest
# first, so that `嘉里大酒店` is not cut to `嘉里`. Any other CJK top-level domain (`_EMAIL_AT_UNLISTED_TLD`) is one
# only where it plainly ends, and only after a local part that is not all CJK: with no space after it, where it
# ends is guesswork, and `回复@张三.你好` (a reply to a user name) would be an address.
_CJK_TLDS = sorted("""
    测试 測試 テスト 테스트
    中国 中國 香港 澳門 澳门 台湾 台灣 新加坡 公司 网络 網絡 商城 在线 中文网 我爱你 网址 网店 网站 集团
    企业 商标 游戏 娱乐 手机 信息 移动 联通 广东 佛山 时尚 微博 慈善 公益 政务 政府 购物 餐厅 健康 世界
    八卦 机构 组织机构 书籍 書籍 珠宝 点看 天主教 嘉里 嘉里大酒店 工行 中信 通販 食品 家電 商店 商業
    みんな コム ストア クラウド セール ファッション ポイント 한국 닷컴 닷넷 삼성
    """.split(), key=len, reverse=True)
_EMAIL_DOMAIN = (rf"@(?:[\w{_MARKS}-]+\.)+(?:{_TLD_LETTER}(?:{_TLD_LETTER}|[{_MARKS}])+"
                 rf"|{'|'.join(_CJK_TLDS)})")
# An address is found from its @: the domain is matched forward, then the local part is read backwards from the @
# over the characters it may hold, and starts at its first letter or digit, so no start is tried for each letter of
# a long run (`a..a..a..`) and any character may come before it (an emoji's variation selector, a decomposed kana's
# voiced mark). A local part has at most 64 characters (RFC 5321); it is read at most LOCAL_PART_MAX characters
# back (a URL-encoded query, `...%26email%3Djohn.doe@`, loses its earlier part to `[EMAIL]` no further back). A
# local part whose last letter is CJK (`用户@`, `山田@`, `사용자@`) is read over CJK letters too: where it starts
# cannot be told from the text before it when no space or punctuation comes between, so the whole run of letters
# before the @ goes with it, up to CJK_RUN_MAX characters (`请发到用户@例子.公司` loses `请发到`: better a few words
# too many than half an address left).
LOCAL_PART_MAX = 128
CJK_RUN_MAX = 256
_EMAIL_AT = re.compile(_EMAIL_DOMAIN)
# 2 to 4 CJK letters (real ones have 2 to 5, `组织机构`), then no letter: the end of the text, a space or punctuation.
_EMAIL_AT_UNLISTED_TLD = re.compile(rf"@(?:[\w{_MARKS}-]+\.)+(?:[{_CJK}](?<=\w)){{2,4}}(?![\w{_MARKS}])")
_EMAIL_WORD_CHAR = re.compile(_EMAIL_WORD)
_WORD_CHAR = re.compile(r"\w")
# The local part's characters, matched on the text before the @ reversed.
_LOCAL_RUN = re.compile(rf"(?:{_EMAIL_WORD}|[.%+'{_MARKS}-])*")
_CJK_LOCAL_RUN = re.compile(rf"[\w.%+'{_MARKS}-]*")
_CJK_LETTER = re.compile(rf"[{_CJK}](?<=\w)")


def email_local_start(text: str, at: int) -> int:
    """Where the local part of the address whose @ is at `at` starts, -1 if it has none. A Latin local part whose
    dot follows a CJK letter (`張.wei@`) goes on over the CJK letters: a dot joins the two, where CJK text glued to a
    Latin address (`请联系john@`) has none."""
    if at == 0:
        return -1
    if _CJK_LETTER.match(text, at - 1):
        start, first = _run_start(text, at, _CJK_LOCAL_RUN, CJK_RUN_MAX), _WORD_CHAR
    else:
        start, first = _run_start(text, at, _LOCAL_RUN, LOCAL_PART_MAX), _EMAIL_WORD_CHAR
        if 0 < start < at and text[start] == "." and _CJK_LETTER.match(text, start - 1):
            start, first = _run_start(text, start, _CJK_LOCAL_RUN, CJK_RUN_MAX), _WORD_CHAR
    word = first.search(text, start, at)
    return -1 if word is None else word.start()


def _run_start(text: str, end: int, run: re.Pattern[str], reach: int) -> int:
    """Where the run of `run`'s characters that ends at `end` starts, looking at most `reach` characters back."""
    lo = max(0, end - reach)
    return end - run.match(text[lo:end][::-1]).end()


def mixed_local_start(text: str, at: int) -> int:
    """`email_local_start`, for a local part that holds a letter or digit of a non-CJK script; -1 otherwise."""
    start = email_local_start(text, at)
    return start if start >= 0 and _EMAIL_WORD_CHAR.search(text, start, at) is not None else -1
# Letters, digits and single spaces after a country code and two check digits; `iban_length` then finds where the
# IBAN ends. Upper case as IBANs are printed, or lower case (typed by hand) starting a word.
_IBAN = re.compile(r"(?:[A-Z]{2}|(?<![A-Za-z0-9])[A-Za-z]{2})\d{2}(?: ?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])")
# US Social Security numbers, 123-45-6789, or 123 45 6789 and 123456789 only a little after a word such as `SSN`
# or `social security` (`_SSN_CONTEXT`; for 9 bare digits not `SSA`, the agency, whose sentences count claims and
# payments): numbers in a table or list are groups of 3, 2 and 4 digits too (`450 25 1200`), and 9 digits are any
# id. Not within a longer run of digit groups with the same separator (a phone, a list of numbers; another number
# after a space may follow: `123-45-6789 2 dependents`); `_ssn_ok` then rules out the numbers never issued. Between
# the word and the number no digit or `;`, and no placeholder (`_collect`): only the number right after the word is
# one. A dashed one right after a part, catalogue, order, model, serial or SKU label, or an item's number label
# (`Part no. 123-45-6789`, `Item #`; `_PART_NUMBER_LABEL`) is that thing's number, unless an SSN word comes before it
# too.
_SSN = re.compile(r"\d(?<![\w.+-]\d)(?<!\d[ -]\d)\d\d-\d\d-\d{4}(?![\w]|[.,]\d|-\d)")
_SSN_SPACED = re.compile(r"\d(?<![\w.+-]\d)(?<!\d[ -]\d)\d\d \d\d \d{4}(?![\w]|[.,]\d| \d)")
_SSN_BARE = re.compile(r"\d(?<![\w.+-]\d)(?<!\d[ -]\d)\d{8}(?![\w]|[.,]\d|-\d)")
_SSN_CONTEXT = re.compile(r"(?i)\b(?:ssns?|ss#|ssa|social[ -]security)(?![a-z])[^\d;]*+$")
_SSN_BARE_CONTEXT = re.compile(r"(?i)\b(?:ssns?|ss#|social[ -]security)(?![a-z])[^\d;]*+$")
# The label, then earlier numbers of a list (`Part nos. 123-45-6789, 123-45-6790`). `Item` alone is a form's field
# (`Item: 123-45-6789 is my social`): only with a number word. Possessive, so that a failing label costs one try.
_PART_NUMBER_LABEL = re.compile(r"(?i)\b(?:(?:parts?|catalog(?:ue)?s?|cat|orders?|models?|serials?|skus?)\.?"
                                r"(?:\s*+(?:no|nos|nr|num|numbers?|#|ids?|codes?)\b\.?)?+"
                                r"|items?\.?\s*+(?:no|nos|nr|num|numbers?|#|ids?|codes?)(?![a-z])\.?)"
                                r"\s*+[:#=-]?+\s*+(?:\d{3}-\d\d-\d{4}(?:\s*+[,/&]\s*+|\s++(?:and|or)\s++))*+$")
# A North American number written as a bare run of 10 digits, or 11 with the trunk code 1 (5551234567): found only
# a little after a word that announces a phone number (`_PHONE_CONTEXT`), as ids, amounts, integer limits
# (2147483647) and numbers in URLs (/playlist/7504851590) are bare runs of 10 digits too. Between the word and the
# number, no digit and nothing of code or maths (an opening bracket, `=`, operators): `call f(4000000000)` and
# `cell A1 = 2147483647` are no phone numbers. Nor is one that counts something (`3105551234 hours`, `... users`),
# but a noun that also says when to call (`4155550123 days, 4155550199 evenings`, `... times`) is no count, nor a
# label that starts the next field (`Phone: 4155550123 Hours: 9-5`, `Tel 4155550123 Hours 9-5`): the noun is in lower
# or upper case, with no colon after it.
_COUNTED = (r"hours?|hrs|minutes?|mins|seconds?|secs|weeks|months|years|people|persons|users|views|visits"
            r"|downloads|copies|units|items|dollars|euros|usd|eur|bytes|records|rows|claims|votes|customers"
            r"|subscribers|followers|players|miles|km|kg|tons")
_PHONE_BARE = re.compile(r"[1-9](?<![\w.+/-][1-9])\d{9,10}(?![\w]|[.,]\d|\s+(?:" + _COUNTED + "|" + _COUNTED.upper()
                         + r")\b(?!\s*:))")
# The word is a whole one (`tell`, `telescope`, `called`, `iPhone` are not it), and an id (`Contact id`, `#`), a new
# clause (`;`) or a placeholder (`_collect`) between it and the number is not a phone's; nor is a number named as
# another kind or as an amount (`order 2125551234`, `account no. ...`, `roughly ...`: `_NAMED_NUMBER`), while the
# same words elsewhere between (`call my account manager at ...`) are prose like any other. `cell` and `SMS` name other
# things too (`Excel cell B holds ...`, `SMS gateway processed ...`): only a few linking words may follow them
# (`cell: `, `my cell is `, `SMS to `). Other such numbers may come between: `Phone: 5551234567, 5559876543` holds
# two. Right after the word, a label's number (`Phone 2: `) and line breaks (a form's `Phone:` above its value);
# further on, a closed aside in brackets (`Tel. (US) `; not `call f(`, code), and no line break nor sentence end (a
# full stop other than an abbreviation's: `Tel.`, `no.`, `Dr.`): the word may be up to PHONE_CONTEXT_CHARS before
# the number, further than other kinds' words, as the sentence is the one that announces it. A number that starts
# the next sentence or line (`Please call me. 4155550123`, `Call me at\n4155550123`) is the word's only within
# CONTEXT_CHARS, as other kinds' (`_PHONE_CONTEXT_NEXT_LINE`).
# Each piece between the word and the number can be read one way only (a full stop is an abbreviation's, glued to
# the next character, or the sentence's end before the number), and the loops are possessive: a window that is no
# phone's context fails in one pass over it, where overlapping readings made `phone no.no.no...#` exponential.
_OTHER_NUMBER = (r"ids?|orders?|invoices?|accounts?|acct|ref|references?|tickets?|tracking|confirmation|receipts?"
                 r"|transactions?|bookings?|reservations?|polic(?:y|ies)|serials?|skus?|isbns?|routing"
                 r"|roughly|approximately|approx|nearly|almost|sold|costs?|priced|paid|worth")
# A noun naming another kind of number, or a word saying an amount, right before the number: alone (`order
# 2125551234`, `roughly 3105551234`) or with a number word or sign and a linking word (`invoice #6465550199`,
# `account: ...`, `account number is ...`). Possessive, so a failing try costs one pass.
_NAMED_NUMBER = re.compile(r"(?i)\b(?:" + _OTHER_NUMBER + r")\b\.?+[^\S\n]*+"
                           r"(?:(?:no|nos|nr|num|numbers?|ids?)\b\.?+[^\S\n]*+|#[^\S\n]*+)?+"
                           r"(?:(?::|is\b|was\b)[^\S\n]*+)?+\Z")
_PHONE_CONTEXT_SENTENCE = (r"(?i)(?:\b(?:phones?|telephones?|tel|call|mobile|cellphone|fax|contact|whatsapp"
                            r"|text me)\b"
                            r"(?:\s*+\d{1,2}+(?=\s*:))?+[\s:.-]*+"
                            r"(?:[^\d\s(\[{<>=+*/^;#.!?]|[^\S\n]"
                            r"|\.(?<=\b(?:no|nr|dr|mr|ms|st)\.)|\.(?<=\b(?:ext|mrs)\.)|[.!?](?=[^\s.!?])"
                            r"|(?<=\s)\((?:[^\W\d_]|[ .,/&'-]){1,30}+\)|(?<!\d)1?\d{10}(?!\d))*+"
                            r"|\b(?:cell|sms)\b(?:[\s:.,-]|\b(?:is|at|on|to|or|and|no|nr|num|number)\b"
                            r"|(?<!\d)1?\d{10}(?!\d))*+)")
_PHONE_CONTEXT = re.compile(_PHONE_CONTEXT_SENTENCE + r"\Z")
_PHONE_CONTEXT_NEXT_LINE = re.compile(_PHONE_CONTEXT_SENTENCE + r"[.!?]*+\s*+\Z")
CONTEXT_CHARS = 40  # how far before a finding its context word may be
PHONE_CONTEXT_CHARS = 80
# 13 to 19 digits, optionally grouped by single spaces or dashes; not glued to other digits or letters.
_CARD = re.compile(r"\d(?<![\w.]\d)(?:[ -]?\d){12,18}(?![\w]|[.,]\d)")
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?![\w]|\.\d)")
# Hex groups and colons, at least two colons (the first character may be one: `::1`), an optional dotted IPv4
# tail (`::ffff:192.0.2.1`); not glued to a word or colon, nor right after `x[`, `)[` or `][` (a slice: `x[1::2]`).
# A sentence's full stop is not taken in (`fe80::1.`). `_ipv6_ok` then parses it and rules out code.
_IPV6 = re.compile(r"[0-9A-Fa-f:](?<![\w:][0-9A-Fa-f:])(?<![\w)\]]\[[0-9A-Fa-f:])(?:(?<=:)|[0-9A-Fa-f]*:)"
                   r"[0-9A-Fa-f]*:[0-9A-Fa-f:]*(?:\.\d{1,3}){0,3}(?![\w:]|\.\d)")
# International (+CC ...; or dialled with 00 or 011 instead of the +, then with a separator after the country code,
# 0044 20 7946 0958 or 011 44 20 7946 0958, so that zero-padded ids are not phones), North American ((415) 555-0100,
# 415-555-0100, and with the trunk code 1 in front: 1-800-555-0100, 1 (800) 555-0100), French-style (a 0 then nine
# digits in pairs, one separator throughout: 06 12 34 56 78, 01-23-45-67-89; not part of a longer run of pairs such
# as 01 02 03 04 05 06) and other trunk-prefixed national numbers (020 7946 0958). Bare digit runs are not phones:
# too many false positives (ids, amounts). Nor is `0dd ddd ddd` right after a digit and a space: that continues an
# amount grouped by thousands (2 000 000 000).
_PHONE = re.compile(
    r"(?:\+(?<![\w+]\+)|0(?<![\w.+-]0)(?:0|11)[ .-]?(?=[1-9]\d{0,2}[ .-]))"
    r"\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,5}[ .-]?\d{2,4}(?!\d)"
    r"|[(\d](?<![\w(.+-][(\d])(?:(?<=\()\d{3}\) ?|(?<=\d)\d{2}[ .-])\d{3}[ .-]\d{4}(?![\d]|[.,]\d)"
    r"|1(?<![\w.+-]1)(?:[ .-]?\([2-9]\d\d\) ?|[ .-][2-9]\d\d[ .-])\d{3}[ .-]\d{4}(?![\d]|[.,]\d)"
    r"|0(?<![\w.+-]0)(?:(?<!(?<![\w.])\d\d 0)[1-9]([ .-])\d\d(?:\1\d\d){3}(?![\d]|[.,]\d|\1\d)"
    r"|(?!(?<=\d 0)\d\d \d{3} \d{3}(?!\d))\d{1,4}[ -]\d{3,4}[ -]?\d{3,4}(?![\d]|[.,]\d))"
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to numbers, mod 97 must be 1."""
    iban = candidate.replace(" ", "")
    if not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    try:
        return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1
    except ValueError:
        return False


# Length of the IBANs of each country in the SWIFT IBAN registry (Nicaragua's were 32 characters before 2023).
IBAN_LENGTHS: dict[str, frozenset[int]] = {country: frozenset({length}) for country, length in (
    ("AD", 24), ("AE", 23), ("AL", 28), ("AT", 20), ("AZ", 28), ("BA", 20), ("BE", 16), ("BG", 22), ("BH", 22),
    ("BI", 27), ("BR", 29), ("BY", 28), ("CH", 21), ("CR", 22), ("CY", 28), ("CZ", 24), ("DE", 22), ("DJ", 27),
    ("DK", 18), ("DO", 28), ("EE", 20), ("EG", 29), ("ES", 24), ("FI", 18), ("FK", 18), ("FO", 18), ("FR", 27),
    ("GB", 22), ("GE", 22), ("GI", 23), ("GL", 18), ("GR", 27), ("GT", 28), ("HN", 28), ("HR", 21), ("HU", 28),
    ("IE", 22), ("IL", 23), ("IQ", 23), ("IS", 26), ("IT", 27), ("JO", 30), ("KW", 30), ("KZ", 20), ("LB", 28),
    ("LC", 32), ("LI", 21), ("LT", 20), ("LU", 20), ("LV", 21), ("LY", 25), ("MC", 27), ("MD", 24), ("ME", 22),
    ("MK", 19), ("MN", 20), ("MR", 27), ("MT", 31), ("MU", 30), ("NL", 18), ("NO", 15), ("OM", 23),
    ("PK", 24), ("PL", 28), ("PS", 29), ("PT", 25), ("QA", 29), ("RO", 24), ("RS", 22), ("RU", 33), ("SA", 24),
    ("SC", 31), ("SD", 18), ("SE", 24), ("SI", 19), ("SK", 24), ("SM", 27), ("SO", 23), ("ST", 25), ("SV", 28),
    ("TL", 23), ("TN", 24), ("TR", 26), ("UA", 29), ("VA", 22), ("VG", 24), ("XK", 20), ("YE", 30))}
IBAN_LENGTHS["NI"] = frozenset({28, 32})


def iban_length(candidate: str) -> int:
    """Length of the IBAN that starts `candidate` (letters, digits and single spaces), 0 if there is none.

    It ends at a space or at the candidate's end, after as many characters as its country's IBANs have, so the
    words that follow it (`GB82 WEST 1234 5698 7654 32 EUR`) are no part of it, and it passes mod-97. A country
    missing from the registry is taken in upper case only (the longest such prefix that passes): a lower-case
    candidate must have its country's exact length too, as words after two letters and two digits are common."""
    lengths = IBAN_LENGTHS.get(candidate[:2].upper())
    if lengths is None and not candidate[:2].isupper():
        return 0
    found = 0
    count = 0
    for i, ch in enumerate(candidate):
        if ch == " ":
            continue
        if lengths is None and ch.islower():
            break
        count += 1
        ends_group = i + 1 == len(candidate) or candidate[i + 1] == " "
        if ends_group and (count in lengths if lengths is not None else count >= 15) and iban_valid(candidate[:i + 1]):
            found = i + 1
            if lengths is not None:
                break
    return found


def _ssn_ok(match: str) -> bool:
    """A number the Social Security Administration issues: area not 000, 666 or 900-999, group not 00, serial
    not 0000."""
    digits = match if len(match) == 9 else match[:3] + match[4:6] + match[7:]
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def part_number_label_before(text: str, start: int, floor: int = 0) -> bool:
    """Whether a part, catalogue, order, model, serial or SKU label comes right before `start`, and no SSN word does
    after `floor`: what follows is that thing's number, shaped like an SSN or not."""
    lo = max(floor, start - CONTEXT_CHARS)
    return _PART_NUMBER_LABEL.search(text, lo, start) is not None and _SSN_CONTEXT.search(text, lo, start) is None


def named_number_before(text: str, start: int, floor: int = 0) -> bool:
    """Whether the words right before `start` (after `floor`) name the number there as an order's, an account's,
    ... or as an amount (`_NAMED_NUMBER`): then it is that, not a phone, whatever phone word came before."""
    return _NAMED_NUMBER.search(text, max(floor, start - CONTEXT_CHARS), start) is not None


def _nanp_ok(match: str) -> bool:
    """A North American number: 10 digits (11 with the trunk code 1 first) whose area code starts with 2-9 and
    neither the area code nor the exchange is an N11 service code (911, 411). The exchange's first digit is not
    checked (555-123-4567, the usual example number, starts its exchange with a 1)."""
    digits = match[1:] if len(match) == 11 else match
    if len(match) == 11 and match[0] != "1":
        return False
    return digits[0] not in "01" and digits[1:3] != "11" and digits[4:6] != "11"


# Issuer identification numbers of the card networks: (first prefix, last prefix, lengths a number of theirs has).
# Nothing starts with 1 (epoch-millisecond timestamps do) or 0 (zero-padded ids do).
_CARD_RANGES: tuple[tuple[str, str, frozenset[int]], ...] = (
    ("4", "4", frozenset({13, 16, 19})),  # Visa
    ("51", "55", frozenset({16})),  # Mastercard
    ("2221", "2720", frozenset({16})),  # Mastercard 2-series
    ("34", "34", frozenset({15})),  # American Express
    ("37", "37", frozenset({15})),
    ("300", "305", frozenset(range(14, 20))),  # Diners Club
    ("36", "36", frozenset(range(14, 20))),
    ("38", "38", frozenset(range(14, 20))),
    ("3528", "3589", frozenset(range(16, 20))),  # JCB
    ("50", "50", frozenset(range(16, 20))),  # Maestro
    ("56", "69", frozenset(range(16, 20))),  # Maestro, Discover (6011, 644-649, 65), UnionPay (62), RuPay (60, 65)
    ("2200", "2204", frozenset({16})),  # Mir
    ("81", "82", frozenset(range(16, 20))),  # RuPay, UnionPay 81
    ("9792", "9792", frozenset({16})),  # Troy
)


def card_number_plausible(digits: str) -> bool:
    """Whether `digits` start like a card network's numbers and have one of that network's lengths."""
    return any(lo <= digits[:len(lo)] <= hi and len(digits) in lengths for lo, hi, lengths in _CARD_RANGES)


# How cards are printed: groups of four (the last may be shorter), or 4-6-5 and 4-6-4 (American Express, Diners).
_CARD_LAYOUT = re.compile(r"\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,4})?|\d{4}[ -]\d{6}[ -]\d{4,5}")


def _card_ok(match: str) -> bool:
    """Luhn-valid 13-19 digits that start like a network's cards (ids and timestamps pass Luhn one time in ten), or
    are grouped as cards are printed, which marks a card whatever its prefix; other groupings (an ISBN-13,
    `978-1878125026`, a hex dump's `00 00 00 ...`) are no card for their grouping alone."""
    digits = match.replace(" ", "").replace("-", "")
    return (13 <= len(digits) <= 19 and (card_number_plausible(digits) or _CARD_LAYOUT.fullmatch(match) is not None)
            and luhn_valid(digits))


def _ipv4_ok(match: str) -> bool:
    """Four octets 0-255; one written with a leading zero (`000`, `07`) is an amount grouped by thousands with dots
    (`2.000.000.000`), as addresses are not written so (Python's own parser refuses them too)."""
    return all(len(octet) <= 3 and int(octet) <= 255 and (octet == "0" or octet[0] != "0")
               for octet in match.split("."))


def _ipv6_ok(match: str) -> bool:
    colons = match.count(":")
    if colons < 2:
        return False
    try:
        ipaddress.IPv6Address(match)
    except ValueError:
        return False
    if colons > 2 or match == "::1":
        return True
    # Just `x::y`, `x::`, `::y` or `::`: code when no group holds a digit (a C++/Rust path: `dead::beef`,
    # `abc::def()`) or every group is a decimal of at most 3 digits (a slice step: `1::2`, `::2`). Any other
    # such address is real (`fe80::1`, `2001::1`, `::a000`).
    if not any(ch.isdigit() for ch in match):
        return False
    return not all(g.isdigit() and len(g) <= 3 for g in match.split(":") if g)


def _phone_ok(match: str) -> bool:
    """7 to 15 digits (E.164's most), not counting an international prefix `00` or `011`. After `00`, at least 9
    (country code and national number): `00 12 34 56 78` is a run of pairs, not a call abroad. A number starting
    with `011` may also be a national one with that trunk and area code (Delhi, Johannesburg)."""
    digits = sum(ch.isdigit() for ch in match)
    if match.startswith("00"):
        return 11 <= digits <= 17
    if match.startswith("011"):
        return 7 <= digits <= 18
    return 7 <= digits <= 15


@dataclass(frozen=True)
class Detector:
    """One kind of sensitive text: a regex, an optional cheap gate and an optional check of each match."""

    kind: str
    pattern: re.Pattern[str]
    gate: Callable[[str], bool] | None = None
    valid: Callable[[str], bool] | None = None
    group: int = 0  # the part of a match that is replaced (e.g. the token after `Bearer`, not the scheme word)
    # The length of the finding at the start of a match, 0 for none: for a kind whose end the regex cannot tell.
    measure: Callable[[str], int] | None = None
    # A pattern that must match in the `context_chars` before the finding (`$` is the finding's start), for a kind
    # that looks like too many ordinary things to be taken on its shape alone.
    context: re.Pattern[str] | None = None
    context_chars: int = CONTEXT_CHARS
    # Another such pattern, searched in the CONTEXT_CHARS before the finding where `context` finds nothing.
    near_context: re.Pattern[str] | None = None
    # Whether the text before a finding (text, finding's start, where the text it may read starts) shows it to be
    # something else of the same shape.
    look_alike: Callable[[str, int, int], bool] | None = None
    # Where the finding starts, given the text and the match's start, -1 for none: for a kind found from a marker
    # inside it (an address from its @) whose start a forward regex would have to try at every position.
    reach_back: Callable[[str, int], int] | None = None


def _gate_api_key(text: str) -> bool:
    # Single characters and short literals found with memchr-speed `in`; `_` covers sk_/rk_/pk_/gh?_/hf_.
    return ("_" in text or "k-" in text or "xox" in text or "lpat-" in text or "AKIA" in text
            or "ASIA" in text or "AIza" in text or "eyJ" in text)


def _gate_aws_secret_key(text: str) -> bool:
    return "ecret" in text or "ECRET" in text or "AWS" in text


def _gate_bearer(text: str) -> bool:
    return "earer" in text or "EARER" in text or "uthorization" in text or "UTHORIZATION" in text


def _gate_email(text: str) -> bool:
    return "@" in text


def _gate_ipv6(text: str) -> bool:
    return ":" in text and _IPV6_HINT.search(text) is not None


_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_NOT_DIGITS = bytes(b for b in range(256) if not 48 <= b <= 57)
# Where numeric PII can be: a run of digits and separators. One scan finds these windows; the numeric
# detectors then run only inside them, widened by 34 characters each side (an IBAN mixes in letters).
_NUMERIC_RUN = re.compile(r"[0-9][0-9 .()/+-]{5,}[0-9]")
_WINDOW_BEFORE = 34
_WINDOW_AFTER = 34
# Fewest digits a text needs for the numeric detectors to run at all: 7 (the shortest phone), or 4 and a dot
# between digits for the IPv4 detector alone (the shortest address, `8.8.8.8`, as in an OTel `client.address` or
# `net.peer.ip` attribute). The hint starts with a literal dot, so `re` skips to the dots instead of trying
# every position, as it would for a digit class (prose has full stops, most of them not between digits).
_MIN_DIGITS = 7
_MIN_DIGITS_IPV4 = 4
_IPV4_HINT = re.compile(r"\.(?<=[0-9]\.)[0-9]")
# Full-width forms of ASCII (U+FF01-U+FF5E: `ｊｏｈｎ＠example.com`, `０９０－１２３４－５６７８`), as CJK input
# methods type them, are looked at as their ASCII forms: one character for one, so a finding's place is the same
# in the text. In UTF-8 they start with EF BC or EF BD, which a bytes search finds at memchr speed (a regex class
# is ten times slower); the ideographic space goes with them.
_FULL_WIDTH_LEADS = (b"\xef\xbc", b"\xef\xbd")
_FULL_WIDTH_TO_ASCII = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
# A finding glued to another (`a@b.co4111111111111111`, `x@y.com+14155550100`) hides the other's start from its
# detector until it is a placeholder, so redaction goes on until a pass finds nothing. A later pass looks only
# RESCAN_MARGIN characters either side of what the pass before replaced where that touches other text, and where a
# finding lost to an overlapping one it did not lie inside (`_rescan_regions`): each pass reads about as much as it
# replaced, so a chain of thousands of glued findings, each hidden by the one before, costs no more than reading it
# once per finding's neighbourhood (passes over the whole text made 22k characters of them take 7 s). It ends, as
# every pass that goes on replaced text by a placeholder, which no detector finds (`Redactor._find`).
RESCAN_MARGIN = 64
# A finding that ends glued to a replaced one may start further back (an API key whose end the address after it
# hid): the next pass also looks back over the text glued before it, up to the last space or placeholder, at most
# RESCAN_REACH characters.
RESCAN_REACH = 512
_GLUED_RUN = re.compile(r"[^\s\]]*")
# What may follow a finding and still leave the text after it as it was: a space (not before a digit, which a
# look-behind over a separator sees: `123 45 6789`), or a closing punctuation mark before a space or the end.
_CLOSING = frozenset(".,;:!?)]}\"'>")
_OPENING = frozenset("([{\"'<")


def builtin_text_detectors() -> list[Detector]:
    """Detectors run over the whole text, each behind its gate, in priority order."""
    return [
        Detector(API_KEY, _API_KEY, _gate_api_key),
        Detector(API_KEY, _AWS_SECRET_KEY, _gate_aws_secret_key, group=1),
        Detector(BEARER_TOKEN, _BEARER, _gate_bearer, group=1),
        Detector(EMAIL, _EMAIL_AT, _gate_email, reach_back=email_local_start),
        Detector(EMAIL, _EMAIL_AT_UNLISTED_TLD, _gate_email, reach_back=mixed_local_start),
        Detector(IP_ADDRESS, _IPV6, _gate_ipv6, _ipv6_ok),
    ]


def builtin_numeric_detectors() -> list[Detector]:
    """Detectors run only inside numeric windows, in priority order (checksummed kinds first)."""
    return [
        Detector(IBAN, _IBAN, measure=iban_length),
        Detector(CARD, _CARD, None, _card_ok),
        Detector(SSN, _SSN, None, _ssn_ok, look_alike=part_number_label_before),
        Detector(SSN, _SSN_SPACED, None, _ssn_ok, context=_SSN_CONTEXT),
        Detector(SSN, _SSN_BARE, None, _ssn_ok, context=_SSN_BARE_CONTEXT),
        Detector(IP_ADDRESS, _IPV4, None, _ipv4_ok),
        Detector(PHONE, _PHONE, None, _phone_ok),
        Detector(PHONE, _PHONE_BARE, None, _nanp_ok, context=_PHONE_CONTEXT, context_chars=PHONE_CONTEXT_CHARS,
                 near_context=_PHONE_CONTEXT_NEXT_LINE, look_alike=named_number_before),
    ]


_Span = tuple[int, int, int, str]  # start, end, priority, kind


def _collect(det: Detector, text: str, lo: int, hi: int, priority: int, spans: list[_Span],
             placeholder_ends: list[int], whole: bool) -> None:
    """Append to `spans` what `det` finds in `text[lo:hi]` and its checks accept. A measured finding shorter than
    its match is searched on from its end: the rest of the match may hold the next one (`DE89 ... or GB82 ...`).
    Unless `hi` is the text's end or a numeric window's (`whole`), a match is taken again with the text after `hi`,
    as it would be on the whole text. A context word or label counts only after the last placeholder before the
    finding (`placeholder_ends`): the placeholder stands for PII, and is no word itself."""
    search, match = det.pattern.search, det.pattern.match
    pos = lo
    while pos <= hi:
        m = search(text, pos, hi)
        if m is None:
            return
        if not whole:
            found_at = m.start()
            m = match(text, found_at)
            if m is None:
                pos = found_at + 1
                continue
        pos = m.end() if m.end() > m.start() else m.end() + 1
        start, end = m.span(det.group)
        if det.valid is not None and not det.valid(m.group(det.group)):
            continue
        if det.measure is not None:
            end = start + det.measure(m.group(det.group))
            if end == start:
                continue
            pos = min(pos, end)
        if det.reach_back is not None:
            start = det.reach_back(text, start)
            if start < 0:
                continue
        if end <= start:  # an empty match (an extra pattern such as `\d*`) hides nothing
            continue
        floor = 0
        if placeholder_ends and (det.context is not None or det.look_alike is not None):
            i = bisect_right(placeholder_ends, start)
            floor = placeholder_ends[i - 1] if i else 0
        if det.context is not None and det.context.search(text, max(floor, start - det.context_chars), start) is None \
                and (det.near_context is None
                     or det.near_context.search(text, max(floor, start - CONTEXT_CHARS), start) is None):
            continue
        if det.look_alike is not None and det.look_alike(text, start, floor):
            continue
        spans.append((start, end, priority, det.kind))


def _overlaps(span: _Span, taken: list[tuple[int, int]], ends: list[int]) -> bool:
    """Whether `span` overlaps one of `taken` (disjoint, by start; `ends` their ends)."""
    i = bisect_right(ends, span[0])
    return i < len(taken) and taken[i][0] < span[1]


def _winners(spans: list[_Span]) -> list[_Span]:
    """The findings kept, by start: taken by priority, then start, each kept only if it overlaps none already kept.
    One sweep per priority over the kept findings (disjoint, so sorted by end too), not a test against each one,
    which was quadratic in the number of findings (14k e-mails took 5 s)."""
    spans.sort(key=lambda s: (s[2], s[0]))
    kept: list[_Span] = []
    for _, level in groupby(spans, key=itemgetter(2)):
        chosen: list[_Span] = []
        k = 0
        for span in level:
            start, end = span[0], span[1]
            while k < len(kept) and kept[k][1] <= start:
                k += 1
            if (k < len(kept) and kept[k][0] < end) or (chosen and chosen[-1][1] > start):
                continue
            chosen.append(span)
        kept = list(merge(kept, chosen))
    return kept


def _numeric_windows(text: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Where numeric PII can be in `text[lo:hi]`: its digit runs, widened each side, merged where they meet."""
    windows: list[tuple[int, int]] = []
    n = len(text)
    for m in _NUMERIC_RUN.finditer(text, lo, hi):
        start, end = max(0, m.start() - _WINDOW_BEFORE), min(n, m.end() + _WINDOW_AFTER)
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    return windows


def _ascii_forms(text: str) -> str:
    """`text` with its full-width forms read as ASCII, one character for one."""
    if text.isascii():
        return text
    encoded = text.encode("utf-8", "surrogatepass")
    if _FULL_WIDTH_LEADS[0] in encoded or _FULL_WIDTH_LEADS[1] in encoded:
        return text.translate(_FULL_WIDTH_TO_ASCII)
    return text


def _touches_text(text: str, start: int, end: int) -> bool:
    """Whether replacing `text[start:end]` may change what a detector sees around it: the text goes on glued to it
    (`x@y.com+1415...`), or past one space a digit sees its digits (`4155550123 123 45 6789`)."""
    if start > 0:
        before = text[start - 1]
        if before.isspace():
            if start > 1 and text[start - 2].isdigit():
                return True
        elif not (before in _OPENING and (start == 1 or text[start - 2].isspace())):
            return True
    if end < len(text):
        after = text[end]
        if after.isspace():
            if end + 1 < len(text) and text[end + 1].isdigit():
                return True
        elif not (after in _CLOSING and (end + 1 == len(text) or text[end + 1].isspace())):
            return True
    return False


def _rescan_regions(text: str, spans: list[_Span], kept: list[_Span]) -> list[_Span]:
    """Where the next pass must look once `kept` are replaced, as (start, end, 0, "") in `text` before the
    replacement: around each finding that touches other text, and around each finding that lost to an overlapping
    one without lying inside it (`john@example.com+14155550100`'s phone part may be one once the address is
    replaced)."""
    regions: list[_Span] = [(min(start - RESCAN_MARGIN, _run_start(text, start, _GLUED_RUN, RESCAN_REACH)),
                             end + RESCAN_MARGIN, 0, "")
                            for start, end, _, _ in kept if _touches_text(text, start, end)]
    if len(spans) > len(kept):
        starts = [span[0] for span in kept]
        chosen = set(kept)
        for span in spans:
            if span in chosen:
                continue
            i = bisect_right(starts, span[0]) - 1
            if i < 0 or kept[i][1] < span[1]:
                regions.append((span[0] - RESCAN_MARGIN, span[1] + RESCAN_MARGIN, 0, ""))
    return regions


def _replace(text: str, seen: str, kept: list[_Span],
             regions: list[_Span]) -> tuple[str, str, list[tuple[int, int]]]:
    """`text` and `seen` (its ASCII reading, the same object when it has no full-width forms) with `kept` replaced by
    placeholders, and `regions` moved to where they are in the new text, clipped and merged."""
    pieces: list[str] = []
    old_starts: list[int] = []
    old_ends: list[int] = []
    new_starts: list[int] = []
    last = length = 0
    for start, end, _, kind in kept:
        pieces.append(text[last:start])
        length += start - last
        old_starts.append(start)
        old_ends.append(end)
        new_starts.append(length)
        pieces.append(f"[{kind}]")
        length += len(kind) + 2
        last = end
    pieces.append(text[last:])
    result = "".join(pieces)
    if seen is not text:
        seen_pieces = [seen[a:b] if i % 2 == 0 else pieces[i] for i, (a, b) in
                       enumerate(_piece_bounds(old_starts, old_ends, len(seen)))]
        seen = "".join(seen_pieces)
    else:
        seen = result

    def moved(pos: int, upper: bool) -> int:
        i = bisect_right(old_starts, pos) - 1
        if i < 0:
            return pos
        shift = new_starts[i] + len(kept[i][3]) + 2
        if pos < old_ends[i]:
            return shift if upper else new_starts[i]
        return shift + pos - old_ends[i]

    moved_regions: list[tuple[int, int]] = []
    for lo, hi, _, _ in sorted(regions):
        lo, hi = moved(max(0, lo), False), moved(min(len(text), hi), True)
        if moved_regions and lo <= moved_regions[-1][1]:
            moved_regions[-1] = (moved_regions[-1][0], max(hi, moved_regions[-1][1]))
        else:
            moved_regions.append((lo, hi))
    return result, seen, moved_regions


def _piece_bounds(starts: list[int], ends: list[int], length: int) -> list[tuple[int, int]]:
    """The (start, end) of the pieces `_replace` joins: the text before each replaced span, the span, ..., the rest."""
    bounds: list[tuple[int, int]] = []
    last = 0
    for start, end in zip(starts, ends):
        bounds += [(last, start), (start, end)]
        last = end
    bounds.append((last, length))
    return bounds


class Redactor:
    """Replaces sensitive substrings in text and JSON-like values, counting replacements by kind.

    Every detector looks at the original text; where two findings overlap, the earlier detector wins
    (configured extra patterns, then secrets, e-mails, IBANs, cards, Social Security numbers, IP addresses, phones).
    """

    def __init__(self, text_detectors: list[Detector], numeric_detectors: list[Detector],
                 enabled: bool = True, cache_size: int = 2048) -> None:
        self.text_detectors = text_detectors
        self.numeric_detectors = numeric_detectors
        # (offset in numeric_detectors, which sets the priority; detector): all of them, or the IPv4 ones alone.
        self._numeric_ranked = list(enumerate(numeric_detectors))
        self._ipv4_ranked = [(offset, det) for offset, det in self._numeric_ranked if det.kind == IP_ADDRESS]
        self.enabled = enabled
        # System prompts and templates repeat across requests: remember recent short results.
        self._cache: dict[str, tuple[str, tuple[tuple[str, int], ...]]] = {}
        self._cache_size = cache_size
        self._secret_keys: dict[str, bool] = {}
        placeholder_kinds = sorted(set(self.kinds) | set(BUILTIN_KINDS), key=len, reverse=True)
        self._placeholder = re.compile(r"\[(?:" + "|".join(map(re.escape, placeholder_kinds)) + r")\]")

    @classmethod
    def from_config(cls, config: RedactionConfig) -> "Redactor":
        """Configured extra patterns run first, so a site-specific id is not half-claimed by a built-in kind."""
        extras = [Detector(name.upper(), re.compile(pattern)) for name, pattern in config.extra_patterns.items()]
        return cls(extras + builtin_text_detectors(), builtin_numeric_detectors(), enabled=config.enabled)

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(d.kind for d in self.text_detectors + self.numeric_detectors))

    def redact(self, text: str, counts: dict[str, int]) -> str:
        """`text` with every finding replaced by `[KIND]`; `counts[KIND]` grows by the number replaced."""
        if not self.enabled or len(text) < 6:  # 'a@b.co' is the shortest finding
            return text
        cacheable = len(text) <= 4096
        if cacheable:
            hit = self._cache.get(text)
            if hit is not None:
                for kind, n in hit[1]:
                    counts[kind] = counts.get(kind, 0) + n
                return hit[0]
        result, found = text, {}
        seen = _ascii_forms(text)
        spans = self._find(seen, None)
        while spans:
            kept = _winners(spans)
            regions = _rescan_regions(seen, spans, kept)
            result, seen, regions = _replace(result, seen, kept, regions)
            for kind in map(itemgetter(3), kept):
                found[kind] = found.get(kind, 0) + 1
            spans = self._find(seen, regions) if regions else []
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
        if cacheable:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[text] = (result, tuple(found.items()))
        return result

    def _find(self, text: str, regions: list[tuple[int, int]] | None) -> list[_Span]:
        """The findings in `text` (in `regions` only, unless None), but none overlapping a placeholder already there:
        a pattern that matches one (a configured `[A-Z_]{5,}`) would otherwise replace it again on the next pass."""
        # Placeholders where a context window or a finding may reach: all of them, or near the regions only, so
        # that a pass reads about as much as its regions (a finding matched on past its region adds those after).
        lo, hi = (0, len(text)) if regions is None else (max(0, regions[0][0] - 2 * PHONE_CONTEXT_CHARS),
                                                         regions[-1][1])
        brackets = "[" in text
        taken = [m.span() for m in self._placeholder.finditer(text, lo, hi)] if brackets else []
        ends = [end for _, end in taken]
        spans = self._detect(text, regions, ends)
        if spans and brackets:
            furthest = max(map(itemgetter(1), spans))
            if furthest > hi:
                taken += [m.span() for m in self._placeholder.finditer(text, hi, furthest)]
                ends = [end for _, end in taken]
            if taken:
                spans = [span for span in spans if not _overlaps(span, taken, ends)]
        return spans

    def _detect(self, text: str, regions: list[tuple[int, int]] | None, placeholder_ends: list[int]) -> list[_Span]:
        """The findings in `text`, or in `regions` of it, its full-width forms already read as ASCII."""
        spans: list[_Span] = []
        whole = regions is None
        areas = [(0, len(text))] if whole else regions
        base = len(self.text_detectors)
        for lo, hi in areas:
            area = text if whole else text[lo:hi]
            for priority, det in enumerate(self.text_detectors):
                if det.gate is not None and not det.gate(area):
                    continue
                _collect(det, text, lo, hi, priority, spans, placeholder_ends, whole)
            digits = len(area.encode("utf-8", "surrogatepass").translate(None, _NOT_DIGITS))
            if digits >= _MIN_DIGITS:
                ranked = self._numeric_ranked
            elif digits >= _MIN_DIGITS_IPV4 and _IPV4_HINT.search(area) is not None:
                ranked = self._ipv4_ranked  # too few digits for any other numeric kind
            else:
                continue
            for window_lo, window_hi in _numeric_windows(text, lo, hi):
                # a numeric window of the whole text ends where its detectors' matches may end; a region's may not
                window_whole = whole or window_hi == len(text)
                for offset, det in ranked:
                    _collect(det, text, window_lo, window_hi, base + offset, spans, placeholder_ends, window_whole)
        return spans

    def _is_secret_key(self, key: Any) -> bool:
        if not isinstance(key, str):
            return False
        known = self._secret_keys.get(key)
        if known is None:
            known = SECRET_KEY_NAME.search(key) is not None
            if len(self._secret_keys) < 10_000:
                self._secret_keys[key] = known
        return known

    def redact_value(self, value: Any, counts: dict[str, int]) -> Any:
        """Redact every string inside a JSON-like value; a value under a credential-like key (`api_key`,
        `authorization`, `password`, ...) is replaced whole, whatever its type (`{"password": 123456}`, a list of
        keys, an object holding a token). Keys themselves are kept."""
        kind = type(value)
        if kind is str:
            return self.redact(value, counts)
        if kind is dict or isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                secret = self._is_secret_key(k) or (isinstance(k, str) and BARE_TOKEN_KEY.fullmatch(k) is not None
                                                     and credential_shaped(v))
                if v not in (None, "", [], {}) and type(v) is not bool and self.enabled and secret:
                    out[k] = f"[{SECRET}]"
                    counts[SECRET] = counts.get(SECRET, 0) + 1
                elif type(v) is str:
                    out[k] = self.redact(v, counts)
                else:
                    out[k] = self.redact_value(v, counts)
            return out
        if kind is list:
            return [self.redact_value(v, counts) for v in value]
        if isinstance(value, str):
            return self.redact(value, counts)
        return value
