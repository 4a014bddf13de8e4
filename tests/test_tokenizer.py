"""soka/tokenizer.py: SentencePiece (LLaMA 2) and byte-level BPE (SmolLM2) against references.

    python -m pytest -q tests/test_tokenizer.py

The BPE oracle is transformers' tokenizer built from the same GGUF, with its pre-tokenizer set to the
one in SmolLM2's tokenizer.json (Digits(individual_digits) then ByteLevel): transformers' GGUF loader
has no entry for llama.cpp's 'smollm' pre type and falls back to GPT-2's split, which differs only
where a whitespace run precedes a digit (checked below).
"""
import json
import re
import time
import unicodedata

import pytest

from soka.tokenizer import BPETokenizer, SentencePieceTokenizer, _pretokenizer, bytes_to_unicode


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def gsm8k(gsm8k_rows):
    return [r["question"] for r in gsm8k_rows["test"]]


def _spread(rows, n):
    """About n of the rows, evenly spaced (all of them if there are fewer)."""
    return rows[::max(1, len(rows) // n)]


@pytest.fixture(scope="module")
def other_texts(data):
    """MATH (LaTeX, unicode), MBPP (code: indentation, newlines, tabs) and hand-picked edge cases."""
    math = _spread(_jsonl(data / "math" / "test.jsonl"), 200)
    mbpp = _spread(_jsonl(data / "mbpp" / "mbpp.jsonl"), 100)
    return ([r["problem"] for r in math] + [r["solution"] for r in math]
            + [r["code"] for r in mbpp] + ["\n".join(r["test_list"]) for r in mbpp] + [
                "x²³ ½ Ⅻ ٣٤ 一二三 ① 𝟙𝟚", "naïve café — “quotes” ‘x’ … 日本語のテキスト 한국어 Ελληνικά русский",
                "emoji 👍🏽 👨‍👩‍👧 🎉", "\t\tdef f(x):\n\t\treturn  x\r\n\r\n   ", "  \n  \n\n 12  34\u00a0 5\u3000 6\u2003",
                "it's they're I'M we'll 'd's", "a\x04b!\x04!", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><file_sep>",
                "<|im_start|><|im_start|>x<|im_end", "  ", "", "\x1c\x1d x \x1c5", "\u0085\u2028 z",
                "1st 2nd 3.14159 -42 1e-5 0x1F $1,000.50", "a  \n\n  7 b\t\t8\n\n9",
            ])


# ---------------------------------------------------------------------------------------------
# SentencePiece: LLaMA 2's tokenizer.model with --data-dir; always, a small BPE model in its
# configuration (byte fallback, digits split, no normalization) that conftest.py trains

@pytest.fixture(scope="module")
def sentencepiece_model(data):
    import sentencepiece
    path = data / "llama2-tokenizer" / "tokenizer.model"
    return SentencePieceTokenizer(path), sentencepiece.SentencePieceProcessor(model_file=str(path))


def test_sentencepiece_ids_and_specials_equal_the_library(sentencepiece_model):
    tok, sp = sentencepiece_model
    for text in ("Hello world", " two  spaces", "x²³ 日本 👍🏽", ""):
        assert tok.encode(text, bos=False) == sp.encode(text)
        assert tok.encode(text) == [1] + sp.encode(text)  # add_bos: LLaMA's convention
        assert tok.encode(text, bos=False, eos=True) == sp.encode(text) + [2]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.vocab_size())
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert sp.pad_id() == -1 and tok.pad_id == tok.eos_id  # no pad piece: eos pads
    assert tok.add_bos is True and tok.has_chat_template is False and tok.end_of_turn == ""
    assert tok.chat_prompt("Hi there") == "Hi there"
    ids = tok.encode("Hello world")
    assert tok.decode([*ids, 2]) == "Hello world" and tok.decode(ids[1:]) == "Hello world"  # bos/eos dropped
    assert tok.encode("<s></s>", bos=False) == sp.encode("<s></s>") and 1 not in sp.encode("<s></s>")


@pytest.mark.extended
def test_llama2_known_ids_and_specials(full_data):
    llama2 = SentencePieceTokenizer(full_data / "llama2-tokenizer" / "tokenizer.model")
    assert llama2.encode("Hello world", bos=False) == [15043, 3186]
    assert llama2.encode("Hello world") == [1, 15043, 3186]  # add_bos: LLaMA's convention
    assert llama2.encode("Hello world", bos=False, eos=True) == [15043, 3186, 2]
    assert (llama2.bos_id, llama2.eos_id, llama2.pad_id, llama2.vocab_size) == (1, 2, 2, 32000)
    assert llama2.decode([1, 15043, 3186, 2]) == "Hello world"  # bos/eos dropped


def test_sentencepiece_round_trips_gsm8k_mbpp_and_unicode(sentencepiece_model, gsm8k_rows, data, other_texts):
    tok, _ = sentencepiece_model
    texts = [r[k] for r in gsm8k_rows["test"] for k in ("question", "answer")]
    texts += [r[k] for r in _jsonl(data / "mbpp" / "mbpp.jsonl") for k in ("text", "code")]
    texts += other_texts
    bad = [t for t in texts if tok.decode(tok.encode(t)) != t]
    assert not bad, bad[:3]


def test_sentencepiece_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        SentencePieceTokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(b"not a SentencePiece model")   # the library raises RuntimeError
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "tokenizer.model")


# ---------------------------------------------------------------------------------------------
# byte-level BPE, no model needed

def test_byte_table_is_a_bijection_onto_printables():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_pretokenizer_digit_split_versus_gpt2():
    smol, gpt2 = _pretokenizer(True), _pretokenizer(False)
    for text in ["x  5", "abc123def", "it's 42!", " \n\n7", "ab  \t1", "²x³", "total: 1,234.5"]:
        assert "".join(smol.findall(text)) == text and "".join(gpt2.findall(text)) == text  # a partition
        # digit split = GPT-2's regex run on the pieces between (and around) each number character
        pieces = [p for p in re.split(r"(\d|²|³)", text) if p]
        expect = [m for p in pieces for m in (gpt2.findall(p) if not re.fullmatch(r"\d|²|³", p) else [p])]
        assert smol.findall(text) == expect, text
    assert gpt2.findall("x  5") == ["x", " ", " 5"] and smol.findall("x  5") == ["x", "  ", "5"]


def _toy(merges, **kw):
    """A byte-level vocabulary (the 256 byte symbols) plus the results of `merges`, in order."""
    tokens = list(bytes_to_unicode().values()) + ["<s>", "</s>"]
    tokens += ["".join(m.split(" ")) for m in merges]
    return BPETokenizer(tokens, merges, bos_id=256, eos_id=257, special=["<s>", "</s>"], control=["<s>", "</s>"], **kw)


def test_merges_apply_lowest_rank_first():
    tok = _toy(["b c", "a b", "a bc"])  # "abc": b+c (rank 0) beats a+b (rank 1), then a+bc
    assert [tok.tokens[i] for i in tok.encode("abc")] == ["abc"]
    tok = _toy(["a b", "b c", "ab c"])  # now a+b first, then ab+c
    assert [tok.tokens[i] for i in tok.encode("abc")] == ["abc"]
    tok = _toy(["a b", "b c"])  # a+b first leaves "ab", "c": no "ab c" merge
    assert [tok.tokens[i] for i in tok.encode("abc")] == ["ab", "c"]
    assert [tok.tokens[i] for i in tok.encode("aaa")] == ["a", "a", "a"]
    tok = _toy(["a a"])
    assert [tok.tokens[i] for i in tok.encode("aaaaa")] == ["aa", "aa", "a"]  # left to right


def test_toy_specials_bos_eos_and_decode():
    tok = _toy(["Ġ w", "Ġw o"], add_bos=True)
    ids = tok.encode("<s>hi wo</s>")
    assert ids[:2] == [256, 256] and ids[-1] == 257  # add_bos, then the "<s>" written in the text
    assert [tok.tokens[i] for i in ids[2:-1]] == ["h", "i", "Ġwo"]
    assert tok.encode("x", bos=False, eos=True) == [tok.token_to_id["x"], 257]
    assert tok.decode(ids) == "hi wo" and tok.decode(tok.encode("é ✓", bos=False)) == "é ✓"
    assert tok.decode([tok.token_to_id["Ã"]]) == "\ufffd"  # half a UTF-8 character
    assert tok.has_chat_template is False and tok.chat_prompt("q") == "q"
    with pytest.warns(UserWarning, match="ChatML"):
        assert _toy([], chat_template="{{ messages }}").has_chat_template is False


# ---------------------------------------------------------------------------------------------
# byte-level BPE on SmolLM2's vocabulary, against transformers

@pytest.fixture(scope="module")
def smol(demo_gguf):
    import transformers  # its GGUF loader needs the gguf package (both in requirements-dev.txt)
    from tokenizers import Tokenizer, pre_tokenizers

    from soka.gguf import read_gguf
    start = time.perf_counter()
    ours = BPETokenizer.from_gguf(read_gguf(demo_gguf).metadata)
    build_s = time.perf_counter() - start
    ref = transformers.AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)
    as_loaded = Tokenizer.from_str(ref.backend_tokenizer.to_str())  # a copy, before the fix below
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return ours, ref, as_loaded, build_s


def test_smollm2_specials(smol):
    ours, ref, _, build_s = smol
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.vocab_size == len(ref) and ours.add_bos is False
    assert ours.end_of_turn == "<|im_end|>" == ref.eos_token and ours.has_chat_template
    assert ours.encode("<|im_start|>") == [ref.convert_tokens_to_ids("<|im_start|>")]
    assert build_s < 10


def test_smollm2_ids_equal_transformers_on_gsm8k(smol, gsm8k):
    ours, ref, as_loaded, _ = smol
    fresh = BPETokenizer(ours.tokens, [" ".join(p) for p in ours.merge_rank], bos_id=ours.bos_id,
                         eos_id=ours.eos_id, special=ours.special)  # empty cache, for the timing
    start = time.perf_counter()
    got = [fresh.encode(q) for q in gsm8k]
    seconds = time.perf_counter() - start
    assert seconds < 5, f"encoding 1,319 GSM8K questions took {seconds:.1f} s"
    want = [ref.encode(q, add_special_tokens=False) for q in gsm8k]
    bad = [q for q, a, b in zip(gsm8k, got, want) if a != b]
    assert not bad, bad[:2]
    # transformers as loaded (GPT-2's split) differs only where a space and a number meet in a way
    # the digit split changes: "  5" (GPT-2: " ", " 5") and " ¾" (GPT-2 merges "Ġ" into "Ġ" + "Â")
    plain = [ids.ids for ids in as_loaded.encode_batch(gsm8k, add_special_tokens=False)]
    differ = [q for q, a, b in zip(gsm8k, got, plain) if a != b]
    assert differ and all(_space_number(q) for q in differ)


def _space_number(text):
    return any(unicodedata.category(c)[0] == "N" and text[i - 1].isspace() and (text[i - 2].isspace() or not c.isascii())
               for i, c in enumerate(text) if i >= 2)


def test_smollm2_ids_and_decode_on_math_mbpp_unicode(smol, other_texts):
    ours, ref, _, _ = smol
    for text in other_texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text[:200]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text[:200]
        # round trip, except control tokens (dropped) and the 21 bytes SmolLM2's vocabulary lacks
        if not any(t in text for t in ours.special) and not re.search("[\x04\x06\x13\x14\x16\x1d]", text):
            assert ours.decode(ids) == text, text[:200]


def test_smollm2_chat_prompt_equals_apply_chat_template(smol):
    ours, ref, _, _ = smol
    user = "Natalia sold clips to 48 of her friends.\nHow many clips did she sell?"
    for system in (None, "You are terse.", ""):
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": user})
        want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        got = ours.chat_prompt(user, system=system)
        assert got == want
        assert ours.encode(got) == ref.encode(want, add_special_tokens=False)
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in ours.chat_prompt(user)


def test_from_tokenizer_json_equals_from_gguf(smol, other_texts, tmp_path):
    ours, ref, _, _ = smol
    ref.save_pretrained(tmp_path)
    tok = BPETokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size)
    assert tok.split_digits and tok.chat_prompt("hi") == ours.chat_prompt("hi")
    for text in other_texts[-15:] + other_texts[:20]:
        assert tok.encode(text) == ours.encode(text), text[:200]


def _write_tokenizer_json(folder, *, vocab_edit=None, merges=(), added=None, eos="</s>", model=None, extra=None,
                          prefix=False):
    """A byte-level tokenizer.json (256 byte symbols, "<s>", "</s>") and its tokenizer_config.json."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())} | {"<s>": 256, "</s>": 257}
    if vocab_edit:
        vocab_edit(vocab)
    added = [{"id": 256, "content": "<s>", "special": True}, {"id": 257, "content": "</s>", "special": True}] \
        if added is None else added
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": list(merges)} if model is None else model,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": prefix}, "added_tokens": added} | (extra or {})))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": eos}))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("change, message", [
    (dict(vocab_edit=lambda v: v.update({"</s>": 200_000_000})), r"'</s>' has id 200000000, outside 0 \.\. 259"),
    (dict(vocab_edit=lambda v: v.update({"</s>": -1})), r"'</s>' has id -1, outside"),
    (dict(added=[{"id": 255, "content": "<s>"}]), r"id 255 is both 'ÿ' and '<s>'"),
    (dict(merges=["a b"]), r"merge 0 'a b' makes 'ab', not a token"),
    (dict(merges=[5]), r"merge 0 5 is not a pair"),
    (dict(merges=[None]), r"merge 0 None is not a pair"),
    (dict(added=[{"id": 258, "content": ""}], vocab_edit=lambda v: v.update({"": 258})),
     "every token must be a non-empty string"),
    (dict(eos="<|end|>"), r"eos_token '<\|end\|>' is not a token of tokenizer\.json"),
    (dict(model="BPE"), r"'model' should be an object \{type, vocab, merges\}, got 'BPE'"),
    (dict(model={"type": "BPE", "vocab": {}}), "the BPE model needs a vocab"),
    (dict(extra={"normalizer": {"type": "Lowercase"}}), "normalizer not implemented"),
    (dict(prefix=True), "add_prefix_space not implemented"),
])
def test_a_malformed_tokenizer_json_is_one_error_before_any_allocation(tmp_path, change, message):
    path = _write_tokenizer_json(tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        BPETokenizer.from_tokenizer_json(path)


def test_a_chat_template_that_is_not_text_is_refused(tmp_path):
    path = _write_tokenizer_json(tmp_path)
    cfg = path.with_name("tokenizer_config.json")
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"chat_template": 5}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat_template should be text, not int data"):
        BPETokenizer.from_tokenizer_json(path)
    # transformers' named templates: the one named "default" is the chat template
    chatml = "<|im_start|>{{ m }}<|im_end|>"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"chat_template": [
        {"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": chatml}]}))
    assert BPETokenizer.from_tokenizer_json(path).chat_template == chatml


def test_the_byte_level_tokenizer_json_of_these_tests_loads(tmp_path):
    tok = BPETokenizer.from_tokenizer_json(_write_tokenizer_json(tmp_path))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    assert tok.decode(tok.encode("Héllo")) == "Héllo"
