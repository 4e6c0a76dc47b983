"""The tokenizer side of the VLM: Qwen2's special tokens, and the small byte-level BPE of the tiny preset.

No hub downloads: the tiny preset ships a 2,000-token byte-level BPE (built by
`scripts/build_tiny_tokenizer.py` from a corpus generated in that script) plus Qwen2's 14 special
tokens, so chat prompts, image placeholders and the end-of-turn token work exactly as with a real
Qwen2-VL checkpoint. Real checkpoints bring their own `tokenizer.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's special tokens, in the order Qwen2 assigns ids after the byte-level vocabulary.
QWEN2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"

# Qwen2's pre-tokenizer split pattern (digits are split one by one, which keeps arithmetic legible).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
TINY_BPE_VOCAB = 2000


def train_byte_level_bpe(corpus: list[str], vocab_size: int = TINY_BPE_VOCAB) -> Tokenizer:
    """Train a Qwen2-style byte-level BPE on `corpus`, then append the Qwen2 special tokens.

    Training is deterministic for a fixed corpus and tokenizers version, which the rebuild test checks.
    """
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(list(QWEN2_SPECIAL_TOKENS))
    return tok


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load `tokenizer.json` from a checkpoint directory, checking the tokens the prompt needs."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"missing tokenizer file: {path}")
    tok = Tokenizer.from_file(str(path))
    missing = [t for t in (PAD_TOKEN, EOS_TOKEN, IMAGE_PAD, VISION_START, VISION_END) if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{path}: tokenizer lacks the Qwen2-VL special tokens {missing}")
    return tok


def save_tokenizer(tok: Tokenizer, directory: str | Path, chat_template: str | None = None) -> None:
    """Write `tokenizer.json` plus a `tokenizer_config.json` that transformers/vLLM can load."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in QWEN2_SPECIAL_TOKENS
    }
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "added_tokens_decoder": added,
        "extra_special_tokens": {"image_token": IMAGE_PAD, "video_token": VIDEO_PAD},
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_tiny_tokenizer() -> Tokenizer:
    return load_tokenizer(TINY_TOKENIZER_DIR)
