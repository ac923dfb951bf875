"""A tiny random-weight Llama-style chat model and its byte-level BPE tokenizer, built offline for
fast tests and benchmarks of the local generator.

The model's replies are noise, but it runs the same transformers code paths as a real model:
chat template, left-padded batches, sampling, streaming and LoRA adapters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"

# ChatML, the template of SmolLM2 and Qwen, with one <|im_start|>role ... <|im_end|> block per
# message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text that the tokenizer learns its merges from. The byte-level alphabet covers any other text.
_TRAINING_TEXT = [
    "I have been feeling anxious about my exams and I cannot sleep well.",
    "It sounds like you are carrying a lot right now. What worries you most?",
    "Thank you for telling me. Would you like to talk about what happened today?",
    "Sometimes a short walk, a glass of water or a slow breath helps a little.",
    "If you are in danger, please call your local emergency number right away.",
    "You are not alone, and it is okay to ask for help from people you trust.",
    "system user assistant: hello, how are you feeling this evening?",
    "我最近压力很大，晚上睡不着觉。",
    "听起来你最近很辛苦。愿意多说一点发生了什么吗？",
    "谢谢你愿意告诉我。你并不孤单。",
    "Take care 🙂 see you tomorrow 🌱 💙",
]


def build_tiny_chat_model(
    folder: Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    with_pad_token: bool = True,
    max_position_embeddings: int = 512,
) -> Path:
    """Build the tiny model and tokenizer in ``folder`` (save_pretrained both) and return it.

    A folder that already contains a build is returned as it is. ``with_pad_token=False`` leaves
    the tokenizer without a pad token, as many chat tokenizers ship.
    """
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_tokenizer(vocab_size=vocab_size, with_pad_token=with_pad_token)
    model = build_tiny_model(tokenizer, seed=seed, max_position_embeddings=max_position_embeddings)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_tokenizer(
    *, vocab_size: int = 512, with_pad_token: bool = True
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ChatML special tokens; any Unicode text round-trips."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_TEXT, trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=IM_END if with_pad_token else None,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, max_position_embeddings: int = 512
) -> LlamaForCausalLM:
    """Create a 2-layer Llama model with random weights drawn from ``seed``."""
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        # Larger than the usual 0.02, so random logits differ clearly and greedy replies vary.
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model
