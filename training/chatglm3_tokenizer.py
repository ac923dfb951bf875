"""Convert ChatGLM3's SentencePiece tokenizer to a Hugging Face fast tokenizer with the same ids.

ChatGLM3 encodes plain text with ``SentencePieceProcessor.encode`` on its ``tokenizer.model`` and
places nine special tokens right after the SentencePiece pieces. A chat prompt is ``[gMASK]``
``sop``, then for each message its role token, the encoding of "\\n" and the encoding of the
content, and generation starts after a final ``<|assistant|>``. Each of those text segments is
encoded on its own, so each one starts with SentencePiece's dummy prefix "▁".

The converted tokenizer is a ``tokenizers`` BPE model over the same pieces. Its special tokens
split the text into segments, and each segment is normalized on its own, so the chat template can
render the whole prompt as one string. Only the newline after a role token needs care: it is in
the same segment as the message content, but ChatGLM3 encodes it separately. The pre-tokenizer
therefore splits a leading newline off every segment that follows a special token and gives both
parts the dummy prefix. The segment at the start of the input is left whole. That covers plain
text and each message content that ``core.generation.chat_tokens.encode_chat`` encodes on its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

logger = logging.getLogger(__name__)

TOKENIZER_MODEL_FILE = "tokenizer.model"

# ChatGLM3's special tokens by their ChatGLM3 names, in id order: the first has the id equal to
# the number of SentencePiece pieces, and each next one the id after it.
SPECIAL_TOKENS = (
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

# The converted tokenizer writes sop and eop as "<sop>" and "<eop>". A special token's text maps
# to one id, and BPE vocabularies often contain "sop" or "eop" as ordinary pieces ("philosophy",
# "people"). Bare "sop" would also match inside such words whenever text is encoded with special
# tokens enabled.
_TOKEN_TEXT = {"sop": "<sop>", "eop": "<eop>"}

# Keys that convert_tokenizer adds to the special token ids.
EOS_KEY = "eos"
PAD_KEY = "pad"

# Role names in messages, and the role token that starts each message.
ROLE_TOKENS = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "observation": "<|observation|>",
}

# ChatGLM3 ends its turn by writing the next role token, so generation stops on these as well
# as on the end-of-sequence token.
STOP_TOKENS = ("<|user|>", "<|observation|>")

# ChatGLM3 writes "metadata + newline" after the role token. MindHarbor messages carry no
# metadata, so the template writes the newline alone.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>"
    "{% elif message['role'] == 'user' %}<|user|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% elif message['role'] == 'observation' %}<|observation|>"
    "{% else %}{{ raise_exception('ChatGLM3 has no chat role ' ~ message['role'] ~ "
    "'; use system, user, assistant or observation.') }}"
    "{% endif %}"
    "{{ '\\n' ~ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# SentencePiece's whitespace symbol (U+2581), which stands for a space in pieces.
_SPACE_SYMBOL = "\u2581"

# Piece types of sentencepiece_model.proto (ModelProto.SentencePiece.Type).
_NORMAL, _USER_DEFINED, _UNUSED = 1, 4, 5
_MODEL_TYPE_BPE = 2

# Texts that convert_tokenizer encodes with both tokenizers before it writes anything. They cover
# the normalizer settings this module reproduces: the dummy prefix, runs of spaces, leading and
# trailing spaces, newlines, tabs, full-width forms and characters outside the vocabulary.
_CHECK_TEXTS = (
    "Hello world",
    " leading space",
    "  two  spaces and trailing  ",
    "\n",
    "\nstarts with a newline\n\n",
    "tab\there",
    " \n \t ",
    "你好，世界！",
    "\u3000全角ｆｕｌｌ　ｗｉｄｔｈ",
    "emoji 😊🙂",
)


class TokenizerConversionError(ValueError):
    """ChatGLM3's tokenizer.model cannot be converted to a tokenizer with the same ids.

    The message names the file or setting at fault.
    """


def convert_tokenizer(src: Path, dst: Path) -> dict[str, int]:
    """Write a fast tokenizer for ChatGLM3's ``src/tokenizer.model`` into ``dst``.

    ``dst`` receives tokenizer.json and tokenizer_config.json with the chat template, and loads
    with ``AutoTokenizer.from_pretrained`` without remote code. Returns the id of each name in
    SPECIAL_TOKENS, plus ``"eos"`` (SentencePiece's end-of-sequence piece) and ``"pad"``
    (the unknown piece, which ChatGLM3 pads with).

    Raises TokenizerConversionError when the file is missing or invalid, uses a SentencePiece
    setting that this converter does not reproduce, or when a check encoding differs from
    SentencePiece's.
    """
    model_file = src / TOKENIZER_MODEL_FILE
    if not model_file.is_file():
        raise TokenizerConversionError(
            f"No {TOKENIZER_MODEL_FILE} in {str(src)!r}. Pass a ChatGLM3 model folder."
        )
    proto, processor = _load_sentencepiece(model_file)
    _reject_unsupported_settings(proto, model_file)

    eos_id, pad_id = processor.eos_id(), processor.unk_id()
    if eos_id < 0:
        raise TokenizerConversionError(
            f"{str(model_file)!r} defines no end-of-sequence piece; ChatGLM3's tokenizer needs one."
        )
    unk_piece = processor.id_to_piece(pad_id)

    tokenizer = _build_tokenizer(proto, unk_piece)
    token_ids = _add_special_tokens(tokenizer, proto, model_file)
    token_ids[EOS_KEY] = eos_id
    token_ids[PAD_KEY] = pad_id
    tokenizer.post_processor = _chatglm3_post_processor(tokenizer, token_ids)
    _check_ids(tokenizer, processor, token_ids, _describe_normalizer(proto, model_file))

    from transformers import PreTrainedTokenizerFast

    fast_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=processor.id_to_piece(eos_id),
        unk_token=unk_piece,
        pad_token=unk_piece,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    dst.mkdir(parents=True, exist_ok=True)
    # save_jinja_files=False keeps the chat template in tokenizer_config.json, where tools that
    # predate transformers' chat_template.jinja file also find it.
    fast_tokenizer.save_pretrained(dst, save_jinja_files=False)
    logger.info(
        "Converted ChatGLM3 tokenizer %r (%d pieces) to a fast tokenizer in %r",
        str(model_file),
        len(proto.pieces),
        str(dst),
    )
    return token_ids


def stop_token_ids(token_ids: dict[str, int]) -> list[int]:
    """Return the ids that end a ChatGLM3 reply: end of sequence, then the STOP_TOKENS."""
    return [token_ids[EOS_KEY], *(token_ids[name] for name in STOP_TOKENS)]


def _load_sentencepiece(model_file: Path) -> tuple[Any, Any]:
    try:
        import sentencepiece
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:
        raise TokenizerConversionError(
            "Converting ChatGLM3's tokenizer.model needs the sentencepiece and protobuf "
            f"packages ({exc}); install them with pip."
        ) from exc

    data = model_file.read_bytes()
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
        processor = sentencepiece.SentencePieceProcessor(model_proto=data)
    except (DecodeError, RuntimeError) as exc:
        raise TokenizerConversionError(
            f"{str(model_file)!r} is not a valid SentencePiece model: {exc}"
        ) from exc
    return proto, processor


def _reject_unsupported_settings(proto: Any, model_file: Path) -> None:
    """Raise TokenizerConversionError for settings whose encoding the conversion would change."""
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type != _MODEL_TYPE_BPE:
        problems.append(f"model type {trainer.model_type} is not BPE ({_MODEL_TYPE_BPE})")
    if not trainer.byte_fallback:
        problems.append("byte_fallback is off")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is on")
    if not normalizer.escape_whitespaces:
        problems.append("escape_whitespaces is off")
    if proto.HasField("denormalizer_spec") and proto.denormalizer_spec.precompiled_charsmap:
        problems.append("a denormalization rule is set")
    user_defined = [piece.piece for piece in proto.pieces if piece.type in (_USER_DEFINED, _UNUSED)]
    if user_defined:
        problems.append(f"user-defined or unused pieces are present: {user_defined[:5]}")
    if problems:
        raise TokenizerConversionError(
            f"{str(model_file)!r} uses SentencePiece settings that the converted tokenizer cannot "
            f"reproduce: {'; '.join(problems)}."
        )


def _build_tokenizer(proto: Any, unk_piece: str) -> Tokenizer:
    spec = proto.normalizer_spec
    tokenizer = Tokenizer(
        models.BPE(
            vocab={piece.piece: index for index, piece in enumerate(proto.pieces)},
            merges=_bpe_merges(proto),
            unk_token=unk_piece,
            byte_fallback=True,
            fuse_unk=False,
        )
    )
    tokenizer.normalizer = _normalizer(spec)
    tokenizer.pre_tokenizer = _pre_tokenizer(spec)
    tokenizer.decoder = _decoder(spec)
    return tokenizer


def _bpe_merges(proto: Any) -> list[tuple[str, str]]:
    """Return every pair of normal pieces that joins into a normal piece, best score first.

    SentencePiece's BPE encoder repeatedly joins the adjacent pair whose concatenation is the
    highest-scoring piece, and ``tokenizers`` joins the pair with the lowest merge rank, so the
    ranks follow the scores.
    """
    # NOTE: of two pairs with equal scores, SentencePiece joins the leftmost and tokenizers the
    # one ranked first (here: the lower piece id). Trained BPE models give each piece its own
    # score, so the results differ only when two overlapping splits of one piece compete, such as
    # "a"+"aa" and "aa"+"a" in the symbols a, aa, a.
    normal = {
        piece.piece: (piece.score, index)
        for index, piece in enumerate(proto.pieces)
        if piece.type == _NORMAL
    }
    ranked = []
    for text, (score, index) in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, normal[left][1], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _normalizer(spec: Any) -> normalizers.Normalizer:
    """Build SentencePiece's normalizer without the dummy prefix, which the pre-tokenizer adds."""
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # SentencePiece drops leading and trailing spaces and keeps one of each run. Only U+0020
        # counts, after the character map, so newlines and tabs stay.
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
        steps.append(normalizers.Replace(Regex(r"\A | \z"), ""))
    steps.append(normalizers.Replace(" ", _SPACE_SYMBOL))
    return normalizers.Sequence(steps)


def _pre_tokenizer(spec: Any) -> pre_tokenizers.PreTokenizer:
    """Split a leading newline off each segment after a special token, and add dummy prefixes.

    After the normalizer no plain space is left in the text, so a space is a safe marker. The
    first Metaspace prepends it only to the segment at offset 0 of the input. Segments without
    it follow a special token, and a newline at their start is split off, because ChatGLM3
    encodes the "\\n" after a role token apart from the message content.
    """
    steps = [
        pre_tokenizers.Metaspace(replacement=" ", prepend_scheme="first", split=False),
        pre_tokenizers.Split(Regex(r"\A\n"), behavior="isolated"),
    ]
    if spec.add_dummy_prefix:
        # Give every piece a space unless it starts with the marker, then turn spaces into "▁".
        # Unlike Metaspace with "▁" directly, this also adds the prefix to text that starts with a
        # space, as SentencePiece does (" a" becomes "▁▁a").
        steps.append(
            pre_tokenizers.Metaspace(replacement=" ", prepend_scheme="always", split=False)
        )
        steps.append(
            pre_tokenizers.Metaspace(replacement=_SPACE_SYMBOL, prepend_scheme="never", split=False)
        )
    else:
        steps.append(pre_tokenizers.Split(Regex(r"\A "), behavior="removed"))
    return pre_tokenizers.Sequence(steps)


def _decoder(spec: Any) -> decoders.Decoder:
    steps = [decoders.Replace(_SPACE_SYMBOL, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        # SentencePiece drops the space of the first piece in these two cases.
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def _add_special_tokens(tokenizer: Tokenizer, proto: Any, model_file: Path) -> dict[str, int]:
    piece_count = len(proto.pieces)
    texts = [_TOKEN_TEXT.get(name, name) for name in SPECIAL_TOKENS]
    clashes = [text for text in texts if tokenizer.token_to_id(text) is not None]
    if clashes:
        raise TokenizerConversionError(
            f"{str(model_file)!r} has pieces with the text of special tokens {clashes}, so "
            "those special tokens cannot get their own ids."
        )
    tokenizer.add_special_tokens(
        [AddedToken(text, special=True, normalized=False) for text in texts]
    )

    token_ids = {}
    for offset, (name, text) in enumerate(zip(SPECIAL_TOKENS, texts, strict=True)):
        token_id = tokenizer.token_to_id(text)
        if token_id != piece_count + offset:
            raise TokenizerConversionError(
                f"Special token {name!r} got id {token_id}, expected {piece_count + offset} "
                f"({piece_count} pieces in {str(model_file)!r} plus {offset})."
            )
        token_ids[name] = token_id
    return token_ids


def _chatglm3_post_processor(
    tokenizer: Tokenizer, token_ids: dict[str, int]
) -> processors.PostProcessor:
    """Add what ChatGLM3's tokenizer adds when special tokens are on.

    That is [gMASK] sop before the text, and the end-of-sequence token after a pair of texts.
    """
    gmask, sop = "[gMASK]", _TOKEN_TEXT["sop"]
    eos = tokenizer.id_to_token(token_ids[EOS_KEY])
    return processors.TemplateProcessing(
        single=f"{gmask} {sop} $A",
        pair=f"{gmask} {sop} $A $B:1 {eos}:1",
        special_tokens=[
            (gmask, token_ids["[gMASK]"]),
            (sop, token_ids["sop"]),
            (eos, token_ids[EOS_KEY]),
        ],
    )


def _check_ids(
    tokenizer: Tokenizer, processor: Any, token_ids: dict[str, int], settings: str
) -> None:
    """Raise TokenizerConversionError unless the check texts encode as ChatGLM3 encodes them.

    Each text is encoded as plain text and as the content of a user message. A character map
    that rewrites newlines, for example, breaks the newline split after role tokens.
    """
    newline_ids = processor.encode("\n")
    for text in _CHECK_TEXTS:
        expected = processor.encode(text)
        plain = tokenizer.encode(text, add_special_tokens=False).ids
        if plain != expected:
            raise TokenizerConversionError(
                f"The converted tokenizer encodes {text!r} as {plain}, but SentencePiece encodes "
                f"it as {expected}. These normalizer settings are not supported: {settings}."
            )
        message = tokenizer.encode(f"<|user|>\n{text}", add_special_tokens=False).ids
        expected_message = [token_ids["<|user|>"], *newline_ids, *expected]
        if message != expected_message:
            raise TokenizerConversionError(
                f"The converted tokenizer encodes a user message {text!r} as {message}, but "
                f"ChatGLM3 encodes it as {expected_message}. These normalizer settings are not "
                f"supported: {settings}."
            )


def _describe_normalizer(proto: Any, model_file: Path) -> str:
    spec = proto.normalizer_spec
    return (
        f"{str(model_file)!r} with normalization rule {spec.name!r}, "
        f"add_dummy_prefix {spec.add_dummy_prefix}, "
        f"remove_extra_whitespaces {spec.remove_extra_whitespaces}"
    )
