"""Personal data scrubbing for exports: typed placeholders in place of PII, Chinese and English.

Numbers with a checksum (mainland resident IDs, bank cards) are replaced only
when the checksum holds, so order numbers and prices survive. Person names and
addresses are found by context (titles, "my therapist ...", "叫 ...", street
words, a Chinese surname list); that part is best effort.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass


class PiiType(enum.StrEnum):
    URL = "url"
    EMAIL = "email"
    IP = "ip"
    CN_ID = "cn_id"
    BANK_CARD = "bank_card"
    PHONE = "phone"
    PASSPORT = "passport"
    HANDLE = "handle"
    DOB = "dob"
    ADDRESS = "address"
    PERSON = "person"


PLACEHOLDERS = {kind: f"[{kind.value.upper()}]" for kind in PiiType}


@dataclass(frozen=True, slots=True)
class PiiSpan:
    start: int
    end: int
    kind: PiiType


# Full-width ASCII and the ideographic space, mapped one character to one, so
# that positions found in the mapped text are positions in the original.
_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}

_TRAILING = ".,;:!?)]}>'\"，。；：！？）】》」』、"
_URL = re.compile(
    r"(?:https?://|www\.)[^\s<>\"'，。！？、）】》」』]+"
    r"|\b(?:[a-z0-9-]+\.)+(?:com|org|net|cn|io|uk|edu|gov|info|me|co|example)/[^\s<>\"'，。！？、）】》」』]*",
    re.IGNORECASE,
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d])(?!\.\d)")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
_VERSION_CONTEXT = re.compile(
    r"(?<![a-z])(?:version|ver\.?|v|版本|build)[^\d\n]{0,6}$", re.IGNORECASE
)
# Numbers that are order, tracking or transaction numbers, not phones.
_NUMBER_CONTEXT = re.compile(r"(?:订单|单号|编号|流水|快递|order|tracking|ref)[^\d\n]{0,6}$", re.I)
_CN_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){15,18}(?![\d])")
_PHONE = re.compile(
    "|".join(
        [
            # Mainland mobile, optionally +86 / 0086, digits grouped by spaces or dashes.
            r"(?<![\d+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d){8}(?!\d)",
            # Mainland landline with its area code.
            r"(?<![\d])\(?0\d{2,3}\)?[ -]?(?:\d{7,8}|\d{3,4}[ -]\d{4})(?!\d)",
            # International with a + prefix.
            r"(?<![\d])\+\d{1,3}(?:[ -]?\(?\d{1,4}\)?){2,5}(?!\d)",
            # North American and UK national forms.
            r"\(\d{3}\)\s?\d{3}-\d{4}(?!\d)",
            r"(?<![\d-])\d{3}-\d{3}-\d{4}(?!\d)",
            r"(?<![\d])(?:0\d{2} \d{4} \d{4}|0\d{3} \d{3} \d{4})(?!\d)",
            r"(?<![\d-])555-01\d\d(?!\d)",
            r"(?<![\d])07\d{3} ?\d{3} ?\d{3}(?!\d)",
        ]
    )
)
_PASSPORT = re.compile(r"(?<![A-Za-z0-9])(?:[EGDSP]\d{8}|[EG][A-Z]\d{7})(?![A-Za-z0-9])")
_PASSPORT_CONTEXT = re.compile(r"(?:passport|护照)[^\d\n]{0,20}(\d{9})(?!\d)", re.IGNORECASE)
_HANDLE = re.compile(
    r"<@!?\d{15,20}>|(?<![A-Za-z0-9_.@])@[A-Za-z0-9_\u4e00-\u9fff][A-Za-z0-9_.\u4e00-\u9fff]{1,31}"
)
_PLATFORM_ID = re.compile(
    r"(?:discord|telegram|tg|qq|uid|user ?id|id|账号|微信号|微信|b站|bilibili|wechat)(?:号)?"
    r"\s*(?:is|was|:|：|是|为)?\s*(\d{5,20})(?![A-Za-z0-9])"
    r"|(?:微信号|微信|wechat)(?: id)?\s*(?:is|:|：|是|为)?\s*"
    r"([A-Za-z][A-Za-z0-9_-]{5,19})(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_MONTHS = (
    "jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    "|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?"
)
_DATE = (
    r"(?:\d{4}|\d{2}(?=年))\s*[-/.年]\s*\d{1,2}\s*[-/.月]\s*\d{1,2}(?:\s*[日号])?"
    r"|\d{1,2}[/.-]\d{1,2}[/.-]\d{4}"
    rf"|(?:{_MONTHS})\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}"
    rf"|\d{{1,2}}(?:st|nd|rd|th)? (?:of )?(?:{_MONTHS})\.?,? \d{{4}}"
)
_DOB = re.compile(
    r"(?:born|dob|d\.o\.b|date of birth|birthday|生日|出生|生于)[^\d\n]{0,24}?"
    rf"({_DATE})|({_DATE})\s*(?:出生|生)",
    re.IGNORECASE,
)
_STREET = (
    "Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|Boulevard|Blvd|Way|Close|Court|Ct"
    "|Place|Pl|Terrace|Grove|Crescent|Gardens|Square|Row|Walk|Hill|Park"
)
_ADDRESS_EN = re.compile(
    rf"\b\d{{1,5}}[A-Za-z]?,? (?:[A-Z][a-z]+ ){{1,3}}(?:{_STREET})\b\.?"
    r"(?:,? (?:Apt|Flat|Unit|Suite) ?\w+)?"
    r"(?:,? [A-Z][a-z]+(?: [A-Z][a-z]+)?)?"
    r"(?:,? (?:[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2}|[A-Z]{2} \d{5}))?"
)
_CJK = "\u4e00-\u9fff"
_ADDRESS_ZH = re.compile(
    rf"(?:[{_CJK}]{{2,7}}(?:省|自治区))?(?:[{_CJK}]{{2,5}}市)?(?:[{_CJK}]{{1,5}}(?:区|县|镇))?"
    rf"[{_CJK}]{{1,8}}(?:路|街|大街|道|大道|巷|胡同|里)\d+(?:弄\d+)?号?"
    rf"(?:\d+(?:栋|号楼|幢|单元|室|楼)|[{_CJK}]{{0,6}}小区\d*(?:栋|号楼)?)*"
    rf"|[{_CJK}]{{2,5}}市[{_CJK}]{{1,5}}(?:区|县)[{_CJK}]{{2,12}}(?:小区|花园|公寓|村)(?:\d+(?:栋|号楼|幢|单元|室))*"
)
_ADDRESS_LEAD = re.compile(r"(?:我?住在|搬到|搬去|寄到|送到|地址(?:是|为)?|在|到|去|住)")
# Common English first names, for "First Last" without a title.
_FIRST_NAMES = (
    "James|John|Robert|Michael|William|David|Richard|Joseph|Thomas|Charles|Daniel|Matthew|Anthony"
    "|Mark|Steven|Paul|Andrew|Joshua|Kevin|Brian|George|Edward|Ryan|Jacob|Gary|Nicholas|Eric"
    "|Jonathan|Stephen|Larry|Justin|Scott|Frank|Benjamin|Samuel|Gregory|Alexander|Patrick|Jack"
    "|Dennis|Tyler|Aaron|Henry|Adam|Nathan|Peter|Zachary|Kyle|Noah|Ethan|Jeremy|Christian|Sean"
    "|Austin|Carl|Harold|Ravi|Arjun|Omar|Ali|Marcus|Liam|Oliver|Harry|Leo|Oscar|Charlie|Tom"
    "|Mary|Patricia|Jennifer|Linda|Elizabeth|Barbara|Susan|Jessica|Sarah|Karen|Nancy|Lisa|Betty"
    "|Margaret|Sandra|Ashley|Kimberly|Emily|Donna|Michelle|Carol|Amanda|Melissa|Deborah|Stephanie"
    "|Rebecca|Laura|Sharon|Cynthia|Kathleen|Amy|Shirley|Angela|Helen|Anna|Brenda|Pamela|Nicole"
    "|Emma|Samantha|Katherine|Christine|Rachel|Catherine|Maria|Heather|Diane|Julie|Olivia|Sophie"
    "|Chloe|Grace|Lucy|Hannah|Ella|Mia|Amelia|Isla|Priya|Aisha|Fatima|Zoe|Jess|Jessie|Kate|Megan"
    "|Lily|Ruby|Freya|Alice|Claire|Fiona|Holly|Jade|Leah|Maya|Nina|Rosa|Sofia|Tara|Yuki|Wei|Ming"
)
_TITLE = r"(?:Dr|Mr|Mrs|Ms|Miss|Prof|Professor|Doctor|Nurse|Coach)\.?"
_NAME = rf"(?!{_TITLE}\s)[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?"
_PERSON_EN = re.compile(
    rf"{_TITLE} ({_NAME}(?: {_NAME})?)"
    rf"|(?<![A-Za-z])((?:{_FIRST_NAMES}) {_NAME})\b"
    rf"|(?:(?:my|our|his|her|the) (?:therapist|counsell?or|doctor|gp|psychiatrist|psychologist"
    rf"|friend|boss|manager|teacher|ex|ex-wife|ex-husband|partner|boyfriend|girlfriend|husband"
    rf"|wife|sister|brother|cousin|neighbou?r|roommate|flatmate|coworker|colleague|mate|sponsor"
    rf"|daughter|son|mum|mom|dad|grandmother|grandfather|grandma|grandpa|nan|aunt|uncle|niece"
    rf"|nephew|receptionist|youth worker|social worker|nurse|tutor|landlord|caseworker)"
    rf"|named|called|name is|name's|name|this is|ask for|contact|contacts:)[,:]? "
    rf"({_NAME}(?: {_NAME})?)"
    rf"|(?:^|(?<=[a-z,;:] ))({_NAME} {_NAME})"
    r"(?=[,.;:)]| \(| from | and | said| is| was| has| made| wants| gave| \d)"
    rf"|(?<![A-Za-z])((?:{_FIRST_NAMES}|Jordan|Paula|Dave|Harriet|Evie|Dylan|Anne))(?![A-Za-z])",
)
# The most common Chinese surnames (single and two-character).
_SURNAMES = (
    "欧阳|司马|上官|诸葛|东方|王|李|张|刘|陈|杨|黄|赵|吴|周|徐|孙|马|朱|胡|郭|何|高|林|罗|郑|梁"
    "|谢|宋|唐|许|韩|冯|邓|曹|彭|曾|肖|田|董|袁|潘|于|蒋|蔡|余|杜|叶|程|苏|魏|吕|丁|任|沈|姚|卢"
    "|姜|崔|钟|谭|陆|汪|范|金|石|廖|贾|夏|韦|付|方|白|邹|孟|熊|秦|邱|江|尹|薛|闫|段|雷|侯|龙|史"
    "|陶|黎|贺|顾|毛|郝|龚|邵|万|钱|严|覃|武|戴|莫|孔|向|汤"
)
# Words after which a Chinese name often follows, and labels of form fields.
_ZH_NAME_CONTEXT = re.compile(
    r"(?:叫|名字是|名字叫|我是|本人|姓名|户名|乘车人|联系人|收件人|和|跟|给|找|问|告诉|联系"
    r"|同事|同学|室友|朋友|男朋友|女朋友|老公|老婆|前任|前男友|前女友|老板|经理|导师|老师|医生"
    r"|咨询师|外婆|外公|奶奶|爷爷|我弟|我妹|我哥|我姐|表哥|表姐|表弟|表妹)[:：\s\[]*$"
)
_ZH_SURNAME = re.compile(rf"(?:{_SURNAMES})")
_ZH_TITLES = (
    "老师",
    "医生",
    "同学",
    "先生",
    "女士",
    "经理",
    "阿姨",
    "叔叔",
    "主任",
    "律师",
    "教授",
    "护士",
)
# Characters that never start or end a given name after a surname here.
_NOT_GIVEN_NAME = set("的了是在也和跟给说吗呢吧啊我你他她们这那个有没不很就都")
# Characters that end a name: punctuation, particles and common verbs.
_ZH_AFTER_NAME = set(
    "，。！？、,.!?：:；;）)］] \t\n"
    "的说是在也和跟给了吗呢吧啊上换把帮老天从被还就都又要会对让发打约拉欺去来每一不没很"
)


def _zh_name_end(text: str, start: int, surname_end: int) -> int | None:
    """Return where a Chinese name that starts at ``start`` ends, or None when none does.

    A name counts when a context word comes before it (or it opens the text or
    a clause) or a title follows it; its given name is one or two characters,
    ending where punctuation, a particle or a common verb begins.
    """
    before = text[max(0, start - 6) : start]
    at_clause_start = start == 0 or text[start - 1] in "，。！？、,.!?：:；;\n["
    titled = False
    for length in (2, 1):
        end = surname_end + length
        given = text[surname_end:end]
        if len(given) != length or not all("\u4e00" <= char <= "\u9fff" for char in given):
            continue
        if given[0] in _NOT_GIVEN_NAME or given[-1] in _NOT_GIVEN_NAME:
            continue
        following = text[end : end + 2]
        titled = any(following.startswith(title) for title in _ZH_TITLES)
        ends_here = end == len(text) or text[end] in _ZH_AFTER_NAME or titled
        if not ends_here:
            continue
        if titled or _ZH_NAME_CONTEXT.search(before) or at_clause_start:
            return end
    return None


def _valid_cn_id(value: str) -> bool:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    total = sum(int(digit) * weight for digit, weight in zip(value[:17], weights, strict=True))
    if "10X98765432"[total % 11] != value[17].upper():
        return False
    try:
        dt.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    return True


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _card_grouping(raw: str) -> bool:
    """Accept plain digits, or groups of four separated by one kind of separator."""
    if raw.isdigit():
        return True
    groups = re.split(r"[ -]", raw)
    return all(len(group) == 4 for group in groups[:-1]) and 1 <= len(groups[-1]) <= 4


def find_pii(text: str) -> list[PiiSpan]:
    """Return the PII spans in ``text``, left to right and never overlapping."""
    mapped = text.translate(_WIDTH)
    found: list[PiiSpan] = []

    def take(start: int, end: int, kind: PiiType) -> None:
        while end > start and mapped[end - 1] in _TRAILING:
            end -= 1
        while start < end and mapped[start].isspace():
            start += 1
        if end <= start:
            return
        if any(span.start < end and start < span.end for span in found):
            return
        found.append(PiiSpan(start, end, kind))

    # Cheap checks first: most chat text has no digits, "@" or links, and the
    # patterns behind those checks are most of the cost (bench/export).
    has_digit = any(char.isdigit() for char in mapped)
    has_at = "@" in mapped
    has_cjk = any("\u4e00" <= char <= "\u9fff" for char in mapped)
    if "://" in mapped or "www." in mapped or "/" in mapped:
        for match in _URL.finditer(mapped):
            take(*match.span(), PiiType.URL)
    if has_at:
        for match in _EMAIL.finditer(mapped):
            take(*match.span(), PiiType.EMAIL)
    if has_digit:
        _find_numbers(mapped, take)
    if ":" in mapped:
        _find_ipv6(mapped, take)
    if has_at:
        for match in _HANDLE.finditer(mapped):
            take(*match.span(), PiiType.HANDLE)
    if has_digit or has_cjk:
        for match in _PLATFORM_ID.finditer(mapped):
            take(*match.span(1 if match.group(1) else 2), PiiType.HANDLE)
    if has_digit:
        for match in _DOB.finditer(mapped):
            take(*match.span(1 if match.group(1) else 2), PiiType.DOB)
        for match in _ADDRESS_EN.finditer(mapped):
            take(*match.span(), PiiType.ADDRESS)
    if has_cjk:
        for match in _ADDRESS_ZH.finditer(mapped):
            # "住在北京市…": the verb before the place is not part of the address.
            lead = _ADDRESS_LEAD.match(match.group())
            take(match.start() + (lead.end() if lead else 0), match.end(), PiiType.ADDRESS)
    if any("A" <= char <= "Z" for char in mapped):
        for match in _PERSON_EN.finditer(mapped):
            group = next(index for index in range(1, 6) if match.group(index))
            take(*match.span(group), PiiType.PERSON)
    if has_cjk:
        for match in _ZH_SURNAME.finditer(mapped):
            end = _zh_name_end(mapped, match.start(), match.end())
            if end is not None:
                take(match.start(), end, PiiType.PERSON)

    found.sort(key=lambda span: span.start)
    return found


def _find_numbers(mapped: str, take: Callable[[int, int, PiiType], None]) -> None:
    """Find the PII made of digits: IPv4, IDs, cards, phones and passports."""
    for match in _IPV4.finditer(mapped):
        if _VERSION_CONTEXT.search(mapped[max(0, match.start() - 12) : match.start()]):
            continue
        if all(0 <= int(part) <= 255 for part in match.group().split(".")):
            take(*match.span(), PiiType.IP)
    for match in _CN_ID.finditer(mapped):
        if _valid_cn_id(match.group()):
            take(*match.span(), PiiType.CN_ID)
    for match in _CARD.finditer(mapped):
        raw = match.group()
        digits = re.sub(r"[ -]", "", raw)
        if 16 <= len(digits) <= 19 and _card_grouping(raw) and _luhn(digits):
            take(*match.span(), PiiType.BANK_CARD)
    for match in _PHONE.finditer(mapped):
        digits = re.sub(r"\D", "", match.group())
        if _NUMBER_CONTEXT.search(mapped[max(0, match.start() - 12) : match.start()]):
            continue
        if len(digits) >= 7:
            take(*match.span(), PiiType.PHONE)
    for match in _PASSPORT.finditer(mapped):
        take(*match.span(), PiiType.PASSPORT)
    for match in _PASSPORT_CONTEXT.finditer(mapped):
        take(*match.span(1), PiiType.PASSPORT)


def _find_ipv6(mapped: str, take: Callable[[int, int, PiiType], None]) -> None:
    for match in _IPV6.finditer(mapped):
        start, candidate = match.start(), match.group()
        if candidate.startswith(":") and not candidate.startswith("::"):
            # A colon before the address ("地址：2001:db8::1") is not part of it.
            start, candidate = start + 1, candidate[1:]
        if candidate.count(":") >= 2 and any(char.isalnum() for char in candidate):
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            take(start, match.end(), PiiType.IP)


def scrub(text: str) -> str:
    """Return ``text`` with every PII span replaced by its typed placeholder, such as [PHONE]."""
    spans = find_pii(text)
    if not spans:
        return text
    pieces = []
    position = 0
    for span in spans:
        pieces.append(text[position : span.start])
        pieces.append(PLACEHOLDERS[span.kind])
        position = span.end
    pieces.append(text[position:])
    return "".join(pieces)
