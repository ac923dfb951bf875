"""Tokenisation for training: the model's chat template, loss on the assistant turns only.

Labels are the tokens of each assistant turn up to and including the
end-of-turn token that the template writes after it (or the end-of-sequence
token when the template writes none), so the model learns to stop; every
other token is -100. A dialogue longer than ``max_length`` is cut into
several samples at exchange boundaries, newest exchanges first, so that every
sample holds at least one complete assistant turn and ends on a labelled stop
token. An exchange too long on its own is left out; no sample without a
labelled token is produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class Sample:
    input_ids: list[int]
    labels: list[int]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    # Render to text and encode it with special tokens off, because the template
    # already writes them; transformers 5 returns a BatchEncoding from tokenize=True.
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _stop_token_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|user|>", "<|observation|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    ids.discard(None)
    return ids


def encode_exchanges(
    tokenizer: Any, conversations: list[dict[str, str]]
) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """Split a rendered dialogue into the system prefix and (user part, assistant part) ids.

    The assistant part ends on its stop token; text the template writes after
    that (a newline) joins the next user part.
    """
    stops = _stop_token_ids(tokenizer)
    system = [turn for turn in conversations[:1] if turn["role"] == "system"]
    body = conversations[len(system) :]
    prefix = _render(tokenizer, system, False) if system else []
    pieces: list[tuple[list[int], list[int]]] = []
    rendered = prefix
    for index in range(0, len(body) - 1, 2):
        messages = system + body[: index + 2]
        prompt = _render(tokenizer, system + body[: index + 1], True)
        full = _render(tokenizer, messages, False)
        if prompt[: len(rendered)] != rendered or full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not render a dialogue prefix as a prefix")
        answer = full[len(prompt) :]
        stop_at = next((i for i, token in enumerate(answer) if token in stops), None)
        if stop_at is None:
            answer = [*answer, tokenizer.eos_token_id]
            trailing: list[int] = []
        else:
            answer, trailing = answer[: stop_at + 1], answer[stop_at + 1 :]
        pieces.append((prompt[len(rendered) :], answer))
        rendered = full
        if trailing:
            # Carry template text after the stop token into the next user part.
            rendered = full[: len(full) - len(trailing)]
    return prefix, pieces


def build_samples(
    tokenizer: Any, conversations: list[dict[str, str]], max_length: int
) -> list[Sample]:
    """Return training samples for one dialogue, each within ``max_length`` tokens."""
    prefix, pieces = encode_exchanges(tokenizer, conversations)
    samples: list[Sample] = []
    end = len(pieces)
    while end > 0:
        start = end
        length = len(prefix)
        # Add exchanges from the newest backwards while they fit.
        while start > 0 and length + sum(map(len, pieces[start - 1])) <= max_length:
            start -= 1
            length += sum(map(len, pieces[start]))
        if start == end:
            # This exchange alone is too long: leave it out and go on with older ones.
            end -= 1
            continue
        input_ids = list(prefix)
        labels = [IGNORE_INDEX] * len(prefix)
        for user_part, answer in pieces[start:end]:
            input_ids += user_part + answer
            labels += [IGNORE_INDEX] * len(user_part) + answer
        samples.append(Sample(input_ids, labels))
        end = start
    samples.reverse()
    return samples
