"""The world's CLIP tokenizer: CLIP's byte-level BPE format with merges learned on the grammar.

The vocabulary is laid out exactly like OpenAI CLIP's (so transformers' ``CLIPTokenizer`` and
``CLIPTokenizerFast`` read it and any text still tokenizes, byte by byte in the worst case):

    256 byte symbols + the same 256 with "</w>" + one token per learned merge + the specials
    "<|startoftext|>" and "<|endoftext|>" (also the padding token, as in CLIP).

The merges come from a ``tokenizers`` BPE (``end_of_word_suffix="</w>"``) trained on every
prompt of the grammar, so every grammar word ends up as one token ("circles</w>"). Building
takes a fraction of a second and is deterministic.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..grammar import all_prompts

# Long enough for the longest grammar prompt (8 words + 2 specials) with room for a little
# paraphrase; short sequences keep cross-attention cheap.
MODEL_MAX_LENGTH = 16
_MIN_VOCAB = 2 * 256 + 2


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 bytes, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _learned_merges(texts: list[str]) -> list[tuple[str, str]]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # A vocab_size far above what the corpus supports: merging stops once every word is one
    # token (min_frequency 1), which is what we want for a closed grammar.
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=1, show_progress=False,
                                  end_of_word_suffix="</w>", special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    with tempfile.TemporaryDirectory() as d:
        tok.model.save(d)
        merges = Path(d, "merges.txt").read_text().splitlines()
    return [tuple(line.split()) for line in merges if line and not line.startswith("#version")]


def build_tokenizer(model_max_length: int = MODEL_MAX_LENGTH):
    """A transformers ``CLIPTokenizer`` with merges learned on the grammar (see module doc)."""
    from transformers import CLIPTokenizer

    merges = _learned_merges(list(all_prompts()))
    byte_chars = _byte_symbols()
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    known = set(tokens)
    for a, b in merges:  # every merge result is a token (in merge order, as in CLIP's file)
        if a + b not in known:
            tokens.append(a + b)
            known.add(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tokenizer.model_max_length = model_max_length
    tokenizer.world_merges = merges  # kept for save_tokenizer's merges.txt
    return tokenizer


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """``save_pretrained`` (tokenizer.json + config) plus CLIP's classic ``vocab.json`` and
    ``merges.txt``, which older transformers versions and other CLIP loaders read."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    vocab = dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    merges = ["#version: 0.2"] + [f"{a} {b}" for a, b in tokenizer.world_merges]
    (directory / "merges.txt").write_text("\n".join(merges) + "\n")


def check_tokenizer(directory: str | os.PathLike, reference=None) -> dict:
    """Reload a saved tokenizer as ``CLIPTokenizer`` and ``CLIPTokenizerFast`` and check it.

    ``from_pretrained`` on a folder without vocabulary files silently gives a 3-token
    tokenizer, so the size is checked, and every grammar prompt must give the same ids with
    both classes (and as ``reference``, the tokenizer that was saved, if given), one token per
    word. Returns a small summary; raises ``ValueError`` on any mismatch.
    """
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    slow = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    fast = CLIPTokenizerFast.from_pretrained(directory, local_files_only=True)
    # what a loader that only knows CLIP's two classic files would build
    classic = CLIPTokenizer(vocab=str(Path(directory, "vocab.json")), merges=str(Path(directory, "merges.txt")))
    if len(slow) < _MIN_VOCAB or not len(slow) == len(fast) == len(classic):
        raise ValueError(f"tokenizer in {directory} has {len(slow)} / {len(fast)} tokens; "
                         f"expected >= {_MIN_VOCAB} (vocab.json / merges.txt missing?)")
    prompts = list(all_prompts())
    ids = slow(prompts)["input_ids"]
    if fast(prompts)["input_ids"] != ids or classic(prompts)["input_ids"] != ids:
        raise ValueError(f"CLIPTokenizer, CLIPTokenizerFast and vocab.json/merges.txt disagree on {directory}")
    if reference is not None and reference(prompts)["input_ids"] != ids:
        raise ValueError(f"the tokenizer reloaded from {directory} differs from the one saved")
    for p, row in zip(prompts, ids):
        if len(row) != len(p.split()) + 2:
            raise ValueError(f"{p!r} does not tokenize to one token per word: {row}")
    longest = max(len(r) for r in ids)
    if longest > slow.model_max_length:
        raise ValueError(f"longest prompt has {longest} tokens > model_max_length {slow.model_max_length}")
    return {"vocab_size": len(slow), "model_max_length": slow.model_max_length,
            "longest_prompt_tokens": longest,
            "merges": len(Path(directory, "merges.txt").read_text().splitlines()) - 1}


# --------------------------------------------------------------------------------------------
# The world's T5 tokenizer (world/sd3's third text encoder)
# --------------------------------------------------------------------------------------------

# The longest grammar prompt is 8 words + "</s>"; a little room for paraphrase.
T5_MAX_LENGTH = 12


def build_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """A T5 (Unigram) tokenizer with one piece per grammar word, and single characters as a
    fallback so that any text still tokenizes. Ids 0 / 1 / 2 are pad / eos / unk, as in T5."""
    import string

    from transformers import T5Tokenizer

    words = sorted({w for p in all_prompts() for w in p.split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    known = {p for p, _ in pieces}
    chars = string.ascii_letters + string.digits + string.punctuation
    # a word piece always beats spelling the word out (scores add up over pieces)
    fallback = [("\u2581", -2.0)] + [(c, -3.0) for c in chars] + [("\u2581" + c, -3.5) for c in chars]
    pieces += [(p, s) for p, s in fallback if p not in known]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.model_max_length = model_max_length
    return tokenizer
