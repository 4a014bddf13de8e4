"""The evaluation runner: batching by length, scoring per task, the results file; with a fake
generate function (known completions) and once with model.generate on a tiny random model."""
import json
import re

import pytest

from soka.evaluate import evaluate
from soka.tasks import format_prompt, load_examples

DATA = None   # conftest.py's data directory (the shipped GSM8K, small MATH and MBPP files, a tokenizer.model)


@pytest.fixture(autouse=True)
def _data(small_data):
    global DATA
    DATA = small_data


class ChatCharTokenizer:
    """One id per character (offset 4); <|im_start|> and <|im_end|> are single ids, the latter eos."""
    has_chat_template, add_bos, end_of_turn = True, False, "<|im_end|>"
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 2, 0x110000 + 4
    SPECIAL = {"<|im_start|>": 3, "<|im_end|>": 2}

    def encode(self, text, *, bos=None, eos=False):
        ids = []
        for piece in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
            ids += [self.SPECIAL[piece]] if piece in self.SPECIAL else [ord(c) + 4 for c in piece]
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids):   # like the real ones: bos/eos/pad dropped, other specials kept
        return "".join("<|im_start|>" if i == 3 else chr(i - 4) if i >= 4 else "" for i in ids)

    def chat_prompt(self, user, *, system=None):
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


class FakeGenerate:
    """Answers each prompt with a fixed completion, and records how it was called."""

    def __init__(self, tokenizer, answers):
        self.tok, self.answers, self.calls = tokenizer, answers, []

    def __call__(self, model, tokenizer, prompts, *, max_new_tokens, temperature, top_p, stop, seed):
        self.calls.append({"lengths": [len(p) for p in prompts], "max_new_tokens": max_new_tokens,
                           "temperature": temperature, "stop": stop, "seed": seed})
        return [self.tok.encode(self.answers[self.tok.decode(p)]) for p in prompts]


def _run(task, examples, completions, tmp_path, batch_size=4):
    tok = ChatCharTokenizer()
    answers = {tok.decode(tok.encode(format_prompt(task, ex, tok))): c
               for ex, c in zip(examples, completions)}
    fake = FakeGenerate(tok, answers)
    out = tmp_path / "results" / f"{task}.json"
    result = evaluate(None, tok, task, examples, batch_size=batch_size, max_new_tokens=77,
                      out_path=out, generate_fn=fake, progress=False, info={"split": "test"})
    return result, fake, out


def test_gsm8k_batches_by_length_and_writes_results(tmp_path):
    examples = load_examples("gsm8k", "test", data_dir=DATA)[:10]
    right = [i % 3 != 0 for i in range(10)]
    completions = [f"Work.\n#### {ex['gold'] if ok else int(ex['gold']) + 1}" for ex, ok in zip(examples, right)]
    completions[1] += "<|im_end|>\n<|im_start|>user\n#### 12345"    # past the end of the turn
    result, fake, out = _run("gsm8k", examples, completions, tmp_path)

    assert result["n"] == 10 and result["correct"] == sum(right)
    assert result["accuracy"] == pytest.approx(sum(right) / 10)
    lengths = [n for call in fake.calls for n in call["lengths"]]
    assert [len(c["lengths"]) for c in fake.calls] == [4, 4, 2]
    assert lengths == sorted(lengths, reverse=True)                     # longest first
    assert sorted(lengths) == sorted(len(ChatCharTokenizer().encode(r["prompt"]))
                                     for r in result["examples"])
    assert all(c["max_new_tokens"] == 77 and c["temperature"] == 0.0 and
               c["stop"] == ("<|im_end|>",) for c in fake.calls)
    for ex, r, ok, c in zip(examples, result["examples"], right, completions):
        assert r["id"] == ex["id"] and r["gold"] == ex["gold"] and r["verdict"] is ok
        assert r["error"] is None
        assert r["prompt"] == format_prompt("gsm8k", ex, ChatCharTokenizer())
        assert r["completion"] == c.split("<|im_end|>")[0]
    assert result["examples"][1]["extracted"] == examples[1]["gold"]   # not the 12345 after the turn
    assert json.loads(out.read_text()) == result
    assert result["settings"]["split"] == "test" and result["settings"]["max_new_tokens"] == 77
    assert sorted(p.name for p in out.parent.iterdir()) == ["gsm8k.json", "gsm8k.jsonl"]   # no temporary left


def test_a_prompt_too_long_for_the_context_gets_the_room_left():
    """Prompts sorted longest first; the longest, past the context with 77 new tokens, runs alone with
    what is left (or, filling the context, not at all); the others run as before."""
    from types import SimpleNamespace
    tok = ChatCharTokenizer()
    examples = load_examples("gsm8k", "test", data_dir=DATA)[:6]
    lengths = [len(tok.encode(format_prompt("gsm8k", ex, tok))) for ex in examples]
    (L1, first), (L2, _) = sorted(zip(lengths, range(6)), reverse=True)[:2]
    assert L2 + 77 <= L1                                     # the others fit whatever happens to the longest
    answers = {tok.decode(tok.encode(format_prompt("gsm8k", ex, tok))): "#### 1" for ex in examples}
    for context, room in ((L1 + 40, 40), (L1, 0)):
        fake = FakeGenerate(tok, answers)
        model = SimpleNamespace(args=SimpleNamespace(max_seq_len=context))
        r = evaluate(model, tok, "gsm8k", examples, batch_size=4, max_new_tokens=77, generate_fn=fake,
                     progress=False)
        calls = [(c["lengths"], c["max_new_tokens"]) for c in fake.calls]
        rest = sorted((n for n in lengths if n != L1), reverse=True)
        assert calls == ([([L1], room)] if room else []) + [(rest[:4], 77), (rest[4:], 77)]
        assert r["settings"]["context_capped"] == {examples[first]["id"]: room}
        assert (r["examples"][first]["completion"] == "") == (room == 0)


class EndOfTurnTextTokenizer(ChatCharTokenizer):
    """<|im_end|> is an ordinary special (id 0) that decodes to its text; eos is another id."""
    SPECIAL = {"<|im_start|>": 3, "<|im_end|>": 0}

    def decode(self, ids):
        return "".join({3: "<|im_start|>", 0: "<|im_end|>"}.get(i, chr(i - 4) if i >= 4 else "")
                       for i in ids)


def test_stop_text_is_trimmed_when_end_of_turn_is_not_eos():
    tok = EndOfTurnTextTokenizer()
    examples = load_examples("gsm8k", "test", data_dir=DATA)[:2]
    completions = [f"#### {examples[0]['gold']}<|im_end|>\n#### 1", "#### 7<|im_end|>"]
    answers = {tok.decode(tok.encode(format_prompt("gsm8k", ex, tok))): c
               for ex, c in zip(examples, completions)}
    result = evaluate(None, tok, "gsm8k", examples, generate_fn=FakeGenerate(tok, answers),
                      progress=False)
    assert [r["completion"] for r in result["examples"]] == [f"#### {examples[0]['gold']}", "#### 7"]
    assert [r["verdict"] for r in result["examples"]] == [True, examples[1]["gold"] == "7"]


def test_math_scoring(tmp_path):
    examples = load_examples("math", "math500", data_dir=DATA)[:6]
    completions = [f"So the answer is $\\boxed{{{ex['gold']}}}$." for ex in examples[:4]]
    completions += ["The answer is $\\boxed{\\frac{12345}{7}}$.", "I don't know."]
    result, _, _ = _run("math", examples, completions, tmp_path, batch_size=8)
    assert [r["verdict"] for r in result["examples"]] == [True] * 4 + [False] * 2
    assert result["examples"][4]["extracted"] == "\\frac{12345}{7}"
    assert result["examples"][5]["extracted"] is None


def test_hostile_math_completions_cost_only_their_own_verdict(tmp_path):
    """Completions that a plain parse turns into an exception (RecursionError, ValueError past 4,300
    digits) or hours of work (\boxed{1e999999999}) are wrong answers; the run goes on and scores the rest."""
    examples = load_examples("math", "math500", data_dir=DATA)[:6]
    hostile = ["{" * 1000 + "1" + "}" * 1000, "1" * 5000, "1e999999999", r"\sqrt{" * 1000 + "2" + "}" * 1000]
    completions = [f"$\\boxed{{{examples[0]['gold']}}}$"] + [f"So $\\boxed{{{h}}}$." for h in hostile]
    completions += [f"$\\boxed{{{examples[5]['gold']}}}$"]
    result, _, out = _run("math", examples, completions, tmp_path, batch_size=8)
    assert [r["verdict"] for r in result["examples"]] == [True, False, False, False, False, True]
    assert [r["extracted"] for r in result["examples"][1:5]] == hostile
    assert all(r["error"] is None for r in result["examples"])
    assert result["correct"] == 2 and json.loads(out.read_text()) == result


def test_an_example_past_the_time_limit_is_recorded_as_its_error(tmp_path, monkeypatch):
    """Scoring one example ran past the time limit: that example is wrong with the reason in its
    row, the child is replaced, and the next examples are scored."""
    import soka.evaluate
    from soka.scorers import score_answers
    monkeypatch.setattr(soka.evaluate, "score_answers",
                        lambda task, c, g, time_limit: score_answers(task, c, g, time_limit=1.5))
    examples = load_examples("math", "math500", data_dir=DATA)[:3]
    completions = [f"$\\boxed{{{ex['gold']}}}$" for ex in examples]
    completions[1] = r"$\boxed{10^{10^{10}}}$"                  # sympy's own deadline is 5 s
    result, _, out = _run("math", examples, completions, tmp_path)
    rows = result["examples"]
    assert [r["verdict"] for r in rows] == [True, False, True]
    assert rows[1]["extracted"] == "10^{10^{10}}"
    assert rows[1]["error"].startswith("TimeoutError: not scored within 1.5 s")
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert json.loads(out.read_text())["examples"][1]["error"] == rows[1]["error"]


def test_mbpp_scoring_in_sandboxes(tmp_path):
    examples = load_examples("mbpp", "test", data_dir=DATA)[:6]
    completions = [f"Here you go:\n```python\n{ex['target']}\n```\nDone." for ex in examples[:3]]
    completions += ["```python\ndef nothing():\n    pass\n```", "import sys\nsys.exit(0)",
                    "```python\nwhile True:\n    pass\n```"]
    tok = ChatCharTokenizer()
    answers = {tok.decode(tok.encode(format_prompt("mbpp", ex, tok))): c
               for ex, c in zip(examples, completions)}
    result = evaluate(None, tok, "mbpp", examples, batch_size=3, max_new_tokens=10,
                      generate_fn=FakeGenerate(tok, answers), progress=False, timeout=2.0)
    assert [r["verdict"] for r in result["examples"]] == [True] * 3 + [False] * 3
    assert result["examples"][0]["extracted"].strip() == examples[0]["target"]
    assert result["accuracy"] == 0.5


def test_with_model_generate_on_a_tiny_model(tmp_path):
    """model.generate as generate_fn, called with the agreed signature."""
    torch = pytest.importorskip("torch")
    from model import ModelArgs, Transformer, generate
    from soka.tokenizer import SentencePieceTokenizer
    tok = SentencePieceTokenizer(DATA / "llama2-tokenizer" / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size,
                                  max_seq_len=1024)).eval()
    examples = load_examples("gsm8k", "test", data_dir=DATA)[:3]
    a = evaluate(model, tok, "gsm8k", examples, generate_fn=generate, batch_size=2, max_new_tokens=4, progress=False)
    b = evaluate(model, tok, "gsm8k", examples, generate_fn=generate, batch_size=3, max_new_tokens=4, progress=False)
    assert a["n"] == 3 and all(isinstance(r["completion"], str) for r in a["examples"])
    assert [r["completion"] for r in a["examples"]] == [r["completion"] for r in b["examples"]]
    assert all(len(tok.encode(r["completion"], bos=False)) <= 4 + 1 for r in a["examples"])
    assert a["settings"]["stop"] == []                                   # no chat template


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(None, ChatCharTokenizer(), "gsm8k", [], batch_size=0, generate_fn=lambda *a, **k: [])
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(None, ChatCharTokenizer(), "gsm9k", [], generate_fn=lambda *a, **k: [])


def test_per_problem_lines_beside_the_results_file(tmp_path):
    """out_path x.json: x.jsonl holds one line per problem, in the examples' order, with what the
    results file says of it (the completion as "prediction"); without out_path nothing is written.
    Built-in examples: no data files needed."""
    from soka.evaluate import problems_path
    examples = [{"id": f"test/{i}", "question": f"What is {i} + {i}?", "gold": str(2 * i)} for i in range(5)]
    completions = ["#### 0", "#### 3", "no answer", "#### 6", "#### 8"]
    result, _, out = _run("gsm8k", examples, completions, tmp_path, batch_size=2)
    assert problems_path(out) == out.with_name("gsm8k.jsonl")
    rows = [json.loads(l) for l in problems_path(out).read_text().splitlines()]
    assert [r["id"] for r in rows] == [ex["id"] for ex in examples]
    assert [r["verdict"] for r in rows] == [True, False, False, True, True] and result["correct"] == 3
    assert [r["extracted"] for r in rows] == ["0", "3", None, "6", "8"]
    assert [r["prediction"] for r in rows] == completions
    for r, e in zip(rows, result["examples"]):
        assert set(r) == {"id", "prediction", "extracted", "gold", "verdict", "error"}
        assert (r["prediction"], r["extracted"], r["gold"], r["verdict"], r["error"]) == \
            (e["completion"], e["extracted"], e["gold"], e["verdict"], e["error"])
    tok = ChatCharTokenizer()
    fake = FakeGenerate(tok, {tok.decode(tok.encode(format_prompt("gsm8k", ex, tok))): "#### 1" for ex in examples})
    evaluate(None, tok, "gsm8k", examples, generate_fn=fake, progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["gsm8k.json", "gsm8k.jsonl"]
    for name in ("x.jsonl", "notes.txt"):   # notes.txt would have written notes.jsonl over a user's file too
        with pytest.raises(ValueError, match=r"should end in \.json"):
            evaluate(None, tok, "gsm8k", examples, generate_fn=fake, progress=False, out_path=tmp_path / name)
    assert not (tmp_path / "notes.jsonl").exists()
