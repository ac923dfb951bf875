"""PII scrubbing: typed placeholders, checksums, full-width digits and look-alike numbers."""

from __future__ import annotations

import itertools

import pytest

from core.privacy.scrub import PiiType, find_pii, scrub


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call me on 138 0013 8000 tonight", "call me on [PHONE] tonight"),
        ("我的手机号是１３９０００１２３４５，别告诉别人", "我的手机号是[PHONE]，别告诉别人"),
        ("座机010-6258 3047", "座机[PHONE]"),
        ("mail me: lily+notes@mail.example.org.", "mail me: [EMAIL]."),
        ("身份证110105199803140028", "身份证[CN_ID]"),
        ("card 4111 1111 1111 1111 expires soon", "card [BANK_CARD] expires soon"),
        ("server at 198.51.100.23:25565", "server at [IP]:25565"),
        ("see https://example.org/help?x=1, ok", "see [URL], ok"),
        ("he's @marcus_b_92 online", "he's [HANDLE] online"),
        ("my discord id is 123456789012345678", "my discord id is [HANDLE]"),
        ("born on 1998-03-14 in spring", "born on [DOB] in spring"),
        ("生日是1999年5月3日", "生日是[DOB]"),
        ("my therapist Dr. Emily Carter said so", "my therapist Dr. [PERSON] said so"),
        ("张伟老师说我可以休息", "[PERSON]老师说我可以休息"),
        ("住在北京市朝阳区建国路88号", "住在[ADDRESS]"),
        ("the flat is 14 Larch Grove, Sheffield S7 1QT", "the flat is [ADDRESS]"),
        ("passport E12345678 expired", "passport [PASSPORT] expired"),
    ],
)
def test_pii_replaced_by_typed_placeholder(text: str, expected: str) -> None:
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "110105199803140029 is not a valid id",  # wrong MOD 11-2 check digit
        "order 4111 1111 1111 1112 shipped",  # fails Luhn
        "订单编号15820240318，客服一直不回复",
        "I took 2 pills at 10:30 and paid 12.50",
        "upgraded to version 1.10.2.3 yesterday",
        "exam on 2024-06-07, wish me luck",
    ],
)
def test_look_alike_numbers_are_kept(text: str) -> None:
    assert scrub(text) == text


def test_spans_do_not_overlap_and_keep_positions() -> None:
    text = "李娜，身份证110105199803140028，手机13705198462"

    spans = find_pii(text)

    assert [span.kind for span in spans] == [PiiType.PERSON, PiiType.CN_ID, PiiType.PHONE]
    assert text[spans[1].start : spans[1].end] == "110105199803140028"
    for first, second in itertools.pairwise(spans):
        assert first.end <= second.start
