"""Tokenizers behind one small interface: SentencePiece (LLaMA 2) and byte-level BPE (SmolLM2).

    tok = SentencePieceTokenizer("tokenizer.model")      # LLaMA 2: bos 1, eos 2, adds BOS
    tok = BPETokenizer.from_gguf(read_gguf(path).metadata) # SmolLM2: from the GGUF's vocabulary
    ids = tok.encode(tok.chat_prompt("What is 2+3?"))
    text = tok.decode(ids)

Both expose: bos_id (None when the vocabulary has none), eos_id, pad_id (eos when there is no pad),
vocab_size, add_bos (the family's convention), encode(text, *, bos=None, eos=False), decode(ids),
has_chat_template, chat_prompt(user, *, system=None), end_of_turn.
"""
from pathlib import Path

import sentencepiece


def _check_file(path, what):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} not found")
    return path


class SentencePieceTokenizer:
    """LLaMA 2's `tokenizer.model`, through the `sentencepiece` library.

    The model has no pad piece (`pad_id() == -1`), so `pad_id` is eos: padded positions are masked
    anyway, and a real id keeps embedding lookups in range. LLaMA 2 base has no chat template.
    """

    has_chat_template = False
    end_of_turn = ""

    def __init__(self, path, *, add_bos=True):
        self.path = _check_file(path, "SentencePiece tokenizer.model")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{self.path}: the SentencePiece model has no eos piece")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.add_bos = add_bos

    def encode(self, text, *, bos=None, eos=False):
        """Text -> ids. Text like "<s>" stays text: SentencePiece never parses control pieces."""
        ids = self.sp.encode(text)
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise ValueError(f"{self.path}: bos requested but the vocabulary has no bos piece")
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids):
        """Ids -> text; control pieces (bos, eos) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def chat_prompt(self, user, *, system=None):
        """No chat template: the user text unchanged (a system prompt has nowhere to go)."""
        return user
