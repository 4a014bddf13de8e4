"""Tokenizers behind one small interface: SentencePiece (LLaMA 2) and byte-level BPE (SmolLM2).

    tok = SentencePieceTokenizer("tokenizer.model")      # LLaMA 2: bos 1, eos 2, adds BOS
    tok = BPETokenizer.from_gguf(read_gguf(path).metadata) # SmolLM2: from the GGUF's vocabulary
    ids = tok.encode(tok.chat_prompt("What is 2+3?"))
    text = tok.decode(ids)

Both expose: bos_id (None when the vocabulary has none), eos_id, pad_id (eos when there is no pad),
vocab_size, add_bos (the family's convention), encode(text, *, bos=None, eos=False), decode(ids),
has_chat_template, chat_prompt(user, *, system=None), end_of_turn.
"""
import functools
import json
import math
import numbers
import re
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import sentencepiece


def _check_file(path, what):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} not found")
    return path


def json_object(path):
    """A JSON object {key: value} from a file; anything else is a ValueError naming the file (model.py
    reads params.json, config.json and the safetensors index through it too)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:    # the message gives line and column
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a JSON {type(obj).__name__}, not an object {{key: value}}")
    return obj


class SentencePieceTokenizer:
    """LLaMA 2's `tokenizer.model`, through the `sentencepiece` library.

    The model has no pad piece (`pad_id() == -1`), so `pad_id` is eos: padded positions are masked
    anyway, and a real id keeps embedding lookups in range. LLaMA 2 base has no chat template.
    """

    has_chat_template = False
    end_of_turn = ""

    def __init__(self, path, *, add_bos=True):
        self.path = _check_file(path, "SentencePiece tokenizer.model")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except RuntimeError:            # the library's parse error, e.g. "Internal: ... ParseFromArray"
            raise ValueError(f"{self.path}: not a SentencePiece model (the library cannot parse it)") from None
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


# ---------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2's scheme; SmolLM2's vocabulary and pre-tokenizer)

def bytes_to_unicode():
    """GPT-2's byte -> printable character table: bytes that are printable Latin-1 map to themselves,
    the other 68 to chr(256 + k) in byte order (so space, byte 32, is 'Ġ' = chr(288), '\\n' is 'Ċ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Unicode White_Space, which is what \s means to the Oniguruma regex of HF tokenizers and to llama.cpp.
# (Python's \s also matches \x1c-\x1f, so it is spelled out.)
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _char_class(flags):
    """A regex character class body (ranges "a-z...") from one bool per code point 0..sys.maxunicode."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.fromiter(flags, np.int8, sys.maxunicode + 1), [0]])))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                   for a, b in zip(edges[::2], edges[1::2] - 1))


@functools.cache
def _pretokenizer(split_digits):
    """GPT-2's split regex with \\p{L} (letters: str.isalpha is exactly categories L*) and \\p{N}
    (numbers: categories N*) built from unicodedata, since Python's `re` has no \\p{..}.

    GPT-2:   's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    SmolLM2 (llama.cpp pre type 'smollm', HF Digits(individual_digits) then ByteLevel) first cuts
    every \\p{N} character out as its own piece and runs GPT-2's regex on the pieces between. One
    regex does both: a number character matches alone, and a whitespace run followed by one counts
    as ending its piece, so `(?!\\S)` becomes `(?![^\\s\\p{N}])` ("x  5" -> "x", "  ", "5").
    Built once per process (a few tenths of a second).
    """
    L = _char_class(map(str.isalpha, map(chr, range(sys.maxunicode + 1))))
    N = _char_class(ch.isnumeric() and unicodedata.category(ch)[0] == "N" for ch in map(chr, range(sys.maxunicode + 1)))
    contractions = r"'s|'t|'re|'ve|'m|'ll|'d"
    if split_digits:
        pattern = (rf"[{N}]|{contractions}| ?[{L}]+| ?[^{_WS}{L}{N}]+"
                   rf"|[{_WS}]+(?![^{_WS}{N}])|[{_WS}]+")
    else:
        pattern = rf"{contractions}| ?[{L}]+| ?[{N}]+| ?[^{_WS}{L}{N}]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
    return re.compile(pattern)


# llama.cpp's `tokenizer.ggml.pre` names -> whether digits are split one by one before GPT-2's regex
_PRE_TYPES = {"smollm": True, "starcoder": True, "refact": True, "codeshell": True, "command-r": True,
              "exaone": True, "minerva": True, "gpt2": False, "gpt-2": False, "mpt": False, "olmo": False,
              "jais": False}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 2 unknown, 5 unused, 6 byte)


class BPETokenizer:
    """Byte-level BPE: text -> special tokens cut out whole -> pre-tokens by regex -> UTF-8 bytes
    spelled in GPT-2's byte alphabet -> merges applied lowest rank first -> ids.

    `special` holds the tokens matched whole in the text before anything else (llama.cpp's control
    and user-defined tokens, HF's added tokens); `control` those that decode drops.
    """

    def __init__(self, tokens, merges, *, bos_id, eos_id, pad_id=None, special=(), control=(),
                 add_bos=False, split_digits=True, chat_template=None, source="BPE vocabulary"):
        self.source = source
        self.tokens = list(tokens)
        if not all(isinstance(t, str) and t for t in self.tokens):
            raise ValueError(f"{source}: every token must be a non-empty string")
        self.vocab_size = len(self.tokens)
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        self.byte_encoder = bytes_to_unicode()
        if not all(chr(c) in self.token_to_id for c in range(ord("!"), ord("~") + 1)):
            raise ValueError(f"{source}: not a byte-level vocabulary (printable ASCII is missing)")
        self.merge_rank = {}
        for rank, merge in enumerate(merges):
            if isinstance(merge, str):      # "a b" (older tokenizer.json) or ["a", "b"]
                pair = tuple(merge.split(" "))
            else:
                pair = tuple(merge) if isinstance(merge, list) else ()
            if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise ValueError(f"{source}: merge {rank} {merge!r} is not a pair")
            if pair[0] + pair[1] not in self.token_to_id:     # encode would meet it as an unknown token
                raise ValueError(f"{source}: merge {rank} {merge!r} makes {pair[0] + pair[1]!r}, not a token")
            self.merge_rank.setdefault(pair, rank)
        for name, i in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
            if i is not None and (not isinstance(i, numbers.Integral) or not 0 <= i < self.vocab_size):
                raise ValueError(f"{source}: {name} id {i} is outside the vocabulary of {self.vocab_size}")
        if eos_id is None:
            raise ValueError(f"{source}: no eos token id")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.add_bos = add_bos
        self.split_digits = split_digits
        self.pretokenize = _pretokenizer(split_digits)
        self.special = {t: self.token_to_id[t] for t in special}
        # Longest first, so that of two specials starting at one place the longer wins (as in HF).
        self.special_re = re.compile("|".join(map(re.escape, sorted(self.special, key=len, reverse=True)))) \
            if self.special else None
        self.control_ids = {self.token_to_id[t] for t in control} | {i for i in (bos_id, eos_id, pad_id) if i is not None}
        self._cache = {}

        alphabet = set(self.byte_encoder.values())
        byte_decoder = {ch: b for b, ch in self.byte_encoder.items()}
        # id -> bytes; a special token written outside the byte alphabet is its own UTF-8
        self.id_bytes = [bytes(byte_decoder[ch] for ch in t) if set(t) <= alphabet else t.encode("utf-8")
                         for t in self.tokens]

        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(f"{source}: the chat template should be text, not {type(chat_template).__name__} data")
        self.chat_template = chat_template
        self.has_chat_template, self.end_of_turn, self.default_system = False, "", None
        if chat_template is not None:
            if "<|im_start|>" in chat_template and "<|im_end|>" in chat_template:
                self.has_chat_template, self.end_of_turn = True, "<|im_end|>"
                m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", chat_template, re.S)
                self.default_system = m[1] if m else None
            else:
                warnings.warn(f"{source}: the chat template is not ChatML (<|im_start|> ... <|im_end|>), "
                              f"the only kind rendered here; chat_prompt returns the user text unchanged")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, metadata, *, source="GGUF metadata"):
        """From llama.cpp's `tokenizer.ggml.*` keys (vocabulary, merges, token types, special ids)."""
        md = metadata
        if md.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model is {md.get('tokenizer.ggml.model')!r}, "
                             f"not byte-level BPE ('gpt2')")
        pre = md.get("tokenizer.ggml.pre", "gpt2")  # absent in old files: GGUF's GPT-2 default, as transformers
        if pre not in _PRE_TYPES:
            raise ValueError(f"{source}: pre-tokenizer {pre!r} is not implemented; known: {sorted(_PRE_TYPES)}")
        missing = [k for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges") if k not in md]
        if missing:
            raise ValueError(f"{source}: no {' or '.join(missing)}")
        tokens = md["tokenizer.ggml.tokens"]
        types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        return cls(tokens, md["tokenizer.ggml.merges"],
                   bos_id=md.get("tokenizer.ggml.bos_token_id"), eos_id=md.get("tokenizer.ggml.eos_token_id"),
                   pad_id=md.get("tokenizer.ggml.padding_token_id"),
                   special=[t for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)],
                   control=[t for t, ty in zip(tokens, types) if ty == _CONTROL],
                   add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)),
                   split_digits=_PRE_TYPES[pre], chat_template=md.get("tokenizer.chat_template"),
                   source=source)

    @classmethod
    def from_tokenizer_json(cls, path):
        """From a Hugging Face `tokenizer.json` (BPE model, ByteLevel pre-tokenizer, optionally after
        Digits(individual_digits)), with bos/eos/pad and the chat template from the
        `tokenizer_config.json` beside it."""
        path = _check_file(path, "tokenizer.json")
        tj = json_object(path)
        model = tj.get("model")
        if not isinstance(model, dict):
            raise ValueError(f"{path}: 'model' should be an object {{type, vocab, merges}}, got {model!r:.40}")
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model type {model.get('type')!r}, expected 'BPE'")
        if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
            raise ValueError(f"{path}: the BPE model needs a vocab {{token: id}} and a list of merges")
        # options that change the ids, which this tokenizer does not implement: refused, not ignored
        unknown = [k for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback",
                               "ignore_merges") if model.get(k)] + (["normalizer"] if tj.get("normalizer") else [])
        pre = tj.get("pre_tokenizer") or {}
        steps = (pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]) \
            if isinstance(pre, dict) else [pre]
        kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) if isinstance(s, dict)
                 else s for s in steps]
        unknown += ["add_prefix_space"] if any(isinstance(s, dict) and s.get("add_prefix_space") for s in steps) else []
        if unknown:
            raise ValueError(f"{path}: {', '.join(unknown)} not implemented (this reads byte-level BPE as GPT-2 "
                             f"and SmolLM2 write it)")
        if kinds == [("ByteLevel", None, True)]:
            split_digits = False
        elif kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
            split_digits = True
        else:
            raise ValueError(f"{path}: pre-tokenizer {kinds} is not implemented (ByteLevel, optionally "
                             f"after Digits(individual_digits=True))")
        vocab, added = model["vocab"], tj.get("added_tokens") or []
        if not isinstance(added, list) or not all(isinstance(a, dict) and "id" in a and "content" in a for a in added):
            raise ValueError(f"{path}: added_tokens should be a list of {{id, content, ...}}")
        pairs = [*((i, t) for t, i in vocab.items()), *((a["id"], a["content"]) for a in added)]
        for i, t in pairs:                  # ids below the count of entries, checked before allocating
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < len(pairs):
                raise ValueError(f"{path}: token {t!r} has id {i!r}, outside 0 .. {len(pairs) - 1}")
        tokens = [None] * (max((i for i, _ in pairs), default=-1) + 1)
        for i, t in pairs:                  # an added token may repeat its vocab entry
            if tokens[i] is not None and tokens[i] != t:
                raise ValueError(f"{path}: id {i} is both {tokens[i]!r} and {t!r}")
            tokens[i] = t
        if None in tokens:
            raise ValueError(f"{path}: ids are not contiguous (id {tokens.index(None)} has no token)")
        odd = [a["content"] for a in added if a.get("lstrip") or a.get("rstrip") or a.get("single_word")]
        if odd:
            raise ValueError(f"{path}: added tokens with lstrip/rstrip/single_word are not implemented: {odd[:3]}")
        cfg_path = path.with_name("tokenizer_config.json")
        cfg = json_object(cfg_path) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):      # transformers' named templates [{name, template}]: the default
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if template is None and path.with_name("chat_template.jinja").is_file():  # transformers >= 4.5x
            template = path.with_name("chat_template.jinja").read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{cfg_path}: chat_template should be text, not {type(template).__name__} data")

        def special_id(key):
            t = cfg.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            if t is not None and t not in tokens:
                raise ValueError(f"{cfg_path}: {key} {t!r} is not a token of {path.name}")
            return None if t is None else tokens.index(t)

        return cls(tokens, tj["model"]["merges"], bos_id=special_id("bos_token"),
                   eos_id=special_id("eos_token"), pad_id=special_id("pad_token"),
                   special=[a["content"] for a in added], control=[a["content"] for a in added if a.get("special")],
                   add_bos=bool(cfg.get("add_bos_token", False)), split_digits=split_digits,
                   chat_template=template, source=str(path))

    # -- encode / decode ----------------------------------------------------------------------

    def _bpe(self, word):
        """One pre-token (already in the byte alphabet) -> ids, merging the lowest-ranked pair first."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        # A byte whose symbol is not in the vocabulary is dropped, as HF tokenizers does: SmolLM2's
        # lacks 21 (control bytes like 0x04, and bytes never seen in UTF-8 text).
        parts = [ch for ch in word if ch in self.token_to_id]
        while len(parts) > 1:
            ranks = [self.merge_rank.get(pair, math.inf) for pair in zip(parts, parts[1:])]
            best = min(ranks)
            if best == math.inf:
                break
            pair, merged, i = (parts[ranks.index(best)], parts[ranks.index(best) + 1]), [], 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.token_to_id[p] for p in parts]
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _encode_ordinary(self, text):
        enc = self.byte_encoder
        out = []
        for piece in self.pretokenize.findall(text):
            out += self._bpe("".join(enc[b] for b in piece.encode("utf-8")))
        return out

    def encode(self, text, *, bos=None, eos=False):
        """Text -> ids. Special tokens written in the text (e.g. "<|im_start|>") become their ids."""
        ids = []
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise ValueError(f"{self.source}: bos requested but the vocabulary has no bos token")
            ids.append(self.bos_id)
        start = 0
        for m in self.special_re.finditer(text) if self.special_re else ():
            ids += self._encode_ordinary(text[start:m.start()])
            ids.append(self.special[m[0]])
            start = m.end()
        ids += self._encode_ordinary(text[start:])
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids):
        """Ids -> text; control tokens (bos, eos, pad, <|endoftext|>, ...) are dropped; byte
        sequences that are not valid UTF-8 (a completion cut mid-character) become U+FFFD."""
        return b"".join(self.id_bytes[i] for i in map(int, ids) if i not in self.control_ids) \
            .decode("utf-8", errors="replace")

    def chat_prompt(self, user, *, system=None):
        """ChatML: a system turn (the template's default when `system` is None; none if the template
        has none), the user turn, and the assistant header, as SmolLM2's template renders it with
        add_generation_prompt=True."""
        if not self.has_chat_template:
            return user
        system = self.default_system if system is None else system
        turns = ([("system", system)] if system is not None else []) + [("user", user)]
        return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"
