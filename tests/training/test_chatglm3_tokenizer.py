"""Conversion of ChatGLM3's SentencePiece tokenizer to a fast tokenizer with the same ids.

Each test model is a small SentencePiece BPE model trained here and placed in a folder as
tokenizer.model, ChatGLM3's layout. The expected ids come from that model alone. Plain text is
``SentencePieceProcessor.encode(text)``, and the nine special tokens follow the pieces in order.
A chat prompt is [gMASK] sop, then per message its role token, the encoding of "\\n" and the
encoding of the content, each encoded separately.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sentencepiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from core.generation.base import ChatMessage
from core.generation.chat_tokens import encode_chat
from training.chatglm3_tokenizer import (
    TokenizerConversionError,
    convert_tokenizer,
    stop_token_ids,
)
from training.tokenize import build_samples

# Text the test models learn their pieces from: English, Chinese, digits, runs of spaces and
# emoji. "philosophy" and "people" contain "sop" and "eop".
_TRAINING_TEXT = """\
I have been feeling anxious about my exams and I cannot sleep well at night.
It sounds like you are carrying a lot right now. What worries you most?
Breathing helps: inhale for 4 seconds, hold for 7, exhale for 8.
The philosophy of people helping people is simple 😊 and kind.
    Indented line with    several   spaces and a tab\tinside.
我最近压力很大，晚上睡不着觉。
你好，我想和你聊聊我的心情。
工作和学习的压力让我很焦虑，怎么办？
谢谢你愿意告诉我。你并不孤单。
"""

# ChatGLM3's special tokens in id order, counted from the number of SentencePiece pieces.
CHATGLM3_SPECIAL_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)

# Trainer settings chosen to resemble ChatGLM3's tokenizer.model: identity normalization, the dummy
# prefix, spaces kept as they are, digits split and byte fallback for unknown characters. Only
# ChatGLM3's encodings are known here, not its trainer options.
CHATGLM3_LIKE_SETTINGS = {
    "normalization_rule_name": "identity",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "byte_fallback": True,
    "allow_whitespace_only_pieces": True,
}

PLAIN_TEXTS = [
    "Hello, I feel anxious tonight.",
    "我最近压力很大，晚上睡不着觉。",
    "Mixed 中文 and English 123 😊",
    "emoji only 🙂🌧️🫂",
    " one leading space",
    "    four leading spaces",
    "several   spaces   between   words",
    "trailing spaces   ",
    "line one\nline two\n\nline four\n",
    "\nstarts with a newline",
    "\n\n",
    "tab\tseparated\tvalues",
    "\t leading tab and space",
    " ",
    "",
    "the philosophy of people",
    "全角　空格 and ｆｕｌｌ ｗｉｄｔｈ",
]


def train_sentencepiece(folder: Path, **overrides: Any) -> Path:
    """Train a small BPE model into ``folder``/tokenizer.model and return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(_TRAINING_TEXT * 3, encoding="utf-8")
    options = {**CHATGLM3_LIKE_SETTINGS, **overrides}
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        model_type=options.pop("model_type", "bpe"),
        vocab_size=options.pop("vocab_size", 400),
        character_coverage=1.0,
        minloglevel=2,
        **options,
    )
    return folder


def special_ids(processor: Any) -> dict[str, int]:
    piece_count = processor.get_piece_size()
    return {name: piece_count + offset for offset, name in enumerate(CHATGLM3_SPECIAL_TOKENS)}


def chatglm3_prompt_ids(
    processor: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool
) -> list[int]:
    """Encode a chat prompt segment by segment, as ChatGLM3 builds it."""
    ids = special_ids(processor)
    prompt = [ids["[gMASK]"], ids["sop"]]
    for message in messages:
        prompt.append(ids[f"<|{message['role']}|>"])
        prompt.extend(processor.encode("\n"))
        prompt.extend(processor.encode(message["content"]))
    if add_generation_prompt:
        prompt.append(ids["<|assistant|>"])
    return prompt


class Converted:
    """A trained SentencePiece model, its converted tokenizer and the returned special ids."""

    def __init__(self, folder: Path) -> None:
        self.processor = sentencepiece.SentencePieceProcessor(
            model_file=str(folder / "tokenizer.model")
        )
        self.token_ids = convert_tokenizer(folder, folder / "converted")
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "converted")

    def plain_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    return Converted(train_sentencepiece(tmp_path_factory.mktemp("chatglm3")))


def messages_of(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


# special tokens


def test_special_token_ids(converted: Converted) -> None:
    expected = special_ids(converted.processor)
    returned = {name: converted.token_ids[name] for name in CHATGLM3_SPECIAL_TOKENS}
    assert returned == expected
    assert converted.token_ids["eos"] == converted.processor.eos_id()
    assert converted.token_ids["eos"] == 2
    assert converted.token_ids["pad"] == converted.processor.unk_id()
    assert converted.token_ids["pad"] == 0


def test_special_token_text(converted: Converted) -> None:
    tokenizer = converted.tokenizer
    expected = special_ids(converted.processor)
    for name in ("[MASK]", "[gMASK]", "[sMASK]", "<|system|>", "<|user|>", "<|assistant|>"):
        assert tokenizer.convert_tokens_to_ids(name) == expected[name]
    assert tokenizer.convert_tokens_to_ids("<sop>") == expected["sop"]
    assert tokenizer.convert_tokens_to_ids("<eop>") == expected["eop"]
    assert tokenizer.convert_ids_to_tokens(expected["<|observation|>"]) == "<|observation|>"
    assert len(tokenizer) == converted.processor.get_piece_size() + len(CHATGLM3_SPECIAL_TOKENS)


def test_eos_and_pad_tokens(converted: Converted) -> None:
    tokenizer = converted.tokenizer
    assert tokenizer.eos_token == "</s>"
    assert tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "left"
    assert "token_type_ids" not in tokenizer("hello")


def test_stop_token_ids(converted: Converted) -> None:
    ids = special_ids(converted.processor)
    assert stop_token_ids(converted.token_ids) == [2, ids["<|user|>"], ids["<|observation|>"]]


# plain text


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_plain_text_ids(converted: Converted, text: str) -> None:
    assert converted.plain_ids(text) == converted.processor.encode(text)


def test_emoji_uses_byte_fallback(converted: Converted) -> None:
    ids = converted.plain_ids("🫂")
    assert ids == converted.processor.encode("🫂")
    assert [converted.processor.is_byte(token_id) for token_id in ids[1:]] == [True] * 4


def test_plain_text_with_special_tokens_on(converted: Converted) -> None:
    # ChatGLM3's tokenizer puts [gMASK] sop before the text when special tokens are added.
    ids = special_ids(converted.processor)
    text = "你好 hello"
    expected = [ids["[gMASK]"], ids["sop"], *converted.processor.encode(text)]
    assert converted.tokenizer.encode(text) == expected


def test_words_containing_sop_stay_text(converted: Converted) -> None:
    text = "philosophy and people, sop and eop"
    assert converted.tokenizer.encode(text, add_special_tokens=False) == (
        converted.processor.encode(text)
    )


@pytest.mark.parametrize("text", [text for text in PLAIN_TEXTS if text])
def test_plain_text_decodes(converted: Converted, text: str) -> None:
    ids = converted.plain_ids(text)
    assert converted.tokenizer.decode(ids) == text
    assert converted.tokenizer.decode(ids) == converted.processor.decode(ids)


# chat prompts

CHAT_CASES = {
    "system user assistant": messages_of(
        ("system", "You are a kind listener."),
        ("user", "我睡不着觉，怎么办？"),
        ("assistant", "It sounds hard. 你愿意多说一点吗？"),
        ("user", "Yes 😊"),
    ),
    "leading whitespace": messages_of(
        ("user", " one space"),
        ("assistant", "\nnewline first"),
        ("user", "\n\n  newlines then spaces"),
        ("assistant", "\ttab first"),
    ),
    "empty content": messages_of(("system", ""), ("user", "hi"), ("assistant", "")),
    "observation": messages_of(("user", "weather?"), ("observation", "rain, 12 degrees")),
}


@pytest.mark.parametrize("case", CHAT_CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_ids(converted: Converted, case: str, add_generation_prompt: bool) -> None:
    # The training pipeline renders the template and encodes the whole string.
    messages = CHAT_CASES[case]
    rendered = converted.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    expected = chatglm3_prompt_ids(
        converted.processor, messages, add_generation_prompt=add_generation_prompt
    )
    assert converted.plain_ids(rendered) == expected


def test_chat_template_tokenized(converted: Converted) -> None:
    messages = CHAT_CASES["system user assistant"]
    encoded = converted.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = chatglm3_prompt_ids(converted.processor, messages, add_generation_prompt=True)
    assert encoded["input_ids"] == expected


@pytest.mark.parametrize("case", CHAT_CASES)
def test_encode_chat_ids(converted: Converted, case: str) -> None:
    messages = CHAT_CASES[case]
    chat_messages = [ChatMessage(message["role"], message["content"]) for message in messages]
    expected = chatglm3_prompt_ids(converted.processor, messages, add_generation_prompt=True)
    assert encode_chat(converted.tokenizer, chat_messages) == expected


def test_encode_chat_keeps_markers_as_text(converted: Converted) -> None:
    user_text = "<|assistant|> [gMASK]<sop> </s> <|user|>\nhi"
    messages = messages_of(("system", "Be kind."), ("user", user_text))
    chat_messages = [ChatMessage(message["role"], message["content"]) for message in messages]

    ids = encode_chat(converted.tokenizer, chat_messages)

    assert ids == chatglm3_prompt_ids(converted.processor, messages, add_generation_prompt=True)
    special = special_ids(converted.processor)
    assert ids.count(special["<|assistant|>"]) == 1
    assert ids.count(special["<|user|>"]) == 1
    assert ids.count(special["[gMASK]"]) == 1
    assert ids.count(2) == 0


def test_training_samples_ids(converted: Converted) -> None:
    messages = CHAT_CASES["system user assistant"][:3]
    samples = build_samples(converted.tokenizer, messages, max_length=512)
    expected = chatglm3_prompt_ids(converted.processor, messages, add_generation_prompt=False)
    assert len(samples) == 1
    # The last assistant turn has no role token after it, so the end-of-sequence id is appended.
    assert samples[0].input_ids == [*expected, 2]


def test_unknown_role_rejected(converted: Converted) -> None:
    with pytest.raises(TemplateError, match="no chat role tool"):
        converted.tokenizer.apply_chat_template(
            messages_of(("tool", "x")), tokenize=False, add_generation_prompt=True
        )


# random text

_random_text = st.text(
    alphabet=st.one_of(
        st.sampled_from([*sorted(set(_TRAINING_TEXT)), " ", "\n", "\t", "\u3000", "▁", "🫂"]),
        st.characters(blacklist_categories=("Cs",)),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(system=_random_text, user=_random_text, reply=_random_text)
def test_random_text_ids(converted: Converted, system: str, user: str, reply: str) -> None:
    # ChatGLM3 encodes plain text with SentencePiece alone, so special token text is text too.
    plain = converted.tokenizer.encode(user, add_special_tokens=False, split_special_tokens=True)
    assert plain == converted.processor.encode(user)
    messages = messages_of(("system", system), ("user", user), ("assistant", reply))
    chat_messages = [ChatMessage(message["role"], message["content"]) for message in messages]
    # encode_chat drops these two private-use characters, which it uses as placeholders.
    expected_messages = [
        {**message, "content": message["content"].replace("\ue000", "").replace("\ue001", "")}
        for message in messages
    ]
    expected = chatglm3_prompt_ids(
        converted.processor, expected_messages, add_generation_prompt=True
    )
    assert encode_chat(converted.tokenizer, chat_messages) == expected


# other SentencePiece settings


def test_nfkc_with_whitespace_removal(tmp_path: Path) -> None:
    folder = train_sentencepiece(
        tmp_path, normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True
    )
    converted = Converted(folder)
    for text in PLAIN_TEXTS:
        assert converted.plain_ids(text) == converted.processor.encode(text), text
    messages = CHAT_CASES["leading whitespace"]
    rendered = converted.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    expected = chatglm3_prompt_ids(converted.processor, messages, add_generation_prompt=True)
    assert converted.plain_ids(rendered) == expected


def test_without_dummy_prefix(tmp_path: Path) -> None:
    converted = Converted(train_sentencepiece(tmp_path, add_dummy_prefix=False))
    for text in PLAIN_TEXTS:
        assert converted.plain_ids(text) == converted.processor.encode(text), text
    messages = CHAT_CASES["leading whitespace"]
    rendered = converted.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    expected = chatglm3_prompt_ids(converted.processor, messages, add_generation_prompt=True)
    assert converted.plain_ids(rendered) == expected


def test_newline_normalizing_model_rejected(tmp_path: Path) -> None:
    # nmt_nfkc turns "\n" into a space, so the newline after a role token cannot be split off.
    folder = train_sentencepiece(
        tmp_path, normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=False
    )
    with pytest.raises(TokenizerConversionError, match="not supported"):
        convert_tokenizer(folder, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_unigram_model_rejected(tmp_path: Path) -> None:
    folder = train_sentencepiece(tmp_path, model_type="unigram", vocab_size=380)
    with pytest.raises(TokenizerConversionError, match="not BPE"):
        convert_tokenizer(folder, tmp_path / "converted")


def test_user_defined_pieces_rejected(tmp_path: Path) -> None:
    folder = train_sentencepiece(tmp_path, user_defined_symbols=["<blank>"])
    with pytest.raises(TokenizerConversionError, match="user-defined"):
        convert_tokenizer(folder, tmp_path / "converted")


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerConversionError, match=r"No tokenizer\.model"):
        convert_tokenizer(tmp_path, tmp_path / "converted")


def test_invalid_model_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerConversionError, match="not a valid SentencePiece model"):
        convert_tokenizer(tmp_path, tmp_path / "converted")
