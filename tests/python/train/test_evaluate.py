"""mola._C.evaluate (mola/train/evaluate.h; docs/recipes.md, docs/design.md, Fidelity to the papers and the authors' code)
against an oracle written here with transformers, sentencepiece and Python's
re: a tiny random llama (vocab 32000 for the real LLaMA-2 SentencePiece
tokenizer) scores each option letter's "Answer: The answer is L." after the
alpaca prompt to the log-probabilities transformers gives (<= 1e-4), and
picks the same options; accuracy by generation (left-padded greedy batches,
decode, the template's response split, the authors' regex with exactly one
match) equals the oracle's on rows built so that some parse, some parse
wrong, and some fail; the majority baseline and the errors.
C++ implementation: src/train/evaluate.cpp.
"""
import json
import math
import pathlib
import re

import pytest
import torch

import mola
from mola import _C

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

REPO = pathlib.Path(__file__).resolve().parents[3]
TOKENIZER = REPO / "data/tokenizers/llama2/tokenizer.model"
ALPACA = REPO / "data/templates/alpaca.json"
BOS, EOS, PAD = 1, 2, 0
NEW = 12

if not TOKENIZER.exists():
    pytest.skip(f"{TOKENIZER} is missing (the LLaMA-2 tokenizer the repository ships)", allow_module_level=True)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-llama")
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    # Unit-scale activations (as test_generate.py), so greedy tokens are far from ties.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2 and "embed_tokens" not in name:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0.0, 1.0)
    hf.save_pretrained(path)
    return hf, mola.CausalLM.from_pretrained(str(path))


def _alpaca():
    return json.loads(ALPACA.read_text())


def _prompt(tmpl, row, output=""):
    # The authors' Prompter.generate_prompt.
    if row.get("input"):
        text = tmpl["prompt_input"].format(instruction=row["instruction"], input=row["input"])
    else:
        text = tmpl["prompt_no_input"].format(instruction=row["instruction"])
    return text + output


QA_ROWS = [
    dict(id="q0", instruction="Context: N/A\nQuestion: Which animal is a mammal?\nOptions: (A) whale (B) shark\n",
         answer="A", options=["A", "B"]),
    dict(id="q1", instruction="Question: Which is hotter?\nOptions: (A) ice (B) tea (C) snow\n", answer="B",
         options=["A", "B", "C"]),
    dict(id="q2", instruction="Is the sentence acceptable?", input="The book was read by her quickly the.",
         answer="B", options=["A", "B"]),
    dict(id="q3", instruction="Question: Pick the odd one.\nOptions: (A) red (B) blue (C) cat (D) green (E) pink\n",
         answer="C", options=["A", "B", "C", "D", "E"]),
    dict(id="q4", instruction="Do the two sentences mean the same?", input="It rains. / Water falls from the sky.",
         answer="A", options=["A", "B"]),
]


def _oracle_loglik(hf, sp, tmpl, row):
    prompt = [BOS] + sp.encode(_prompt(tmpl, row))
    scores = []
    for letter in row["options"]:
        full = [BOS] + sp.encode(_prompt(tmpl, row, f"Answer: The answer is {letter}."))
        start = 0
        while start < len(prompt) and prompt[start] == full[start]:
            start += 1
        with torch.no_grad():
            logp = hf(torch.tensor([full])).logits[0].float().log_softmax(-1)
        scores.append(sum(float(logp[t - 1, full[t]]) for t in range(max(start, 1), len(full))))
    return scores


def test_loglik_scores_equal_transformers(checkpoint, sp):
    hf, model = checkpoint
    tmpl = _alpaca()
    rows = [_C.Row(**r) for r in QA_ROWS]
    out = _C.evaluate(model, _C.Tokenizer.from_file(str(TOKENIZER)), _C.PromptTemplate.from_json_file(str(ALPACA)),
                      rows, _C.EvalOptions(methods=["loglik"], batch_size=3), return_predictions=True)
    assert set(out) == {"n", "majority_answer", "majority_accuracy", "loglik_accuracy", "loglik_correct",
                        "predictions"}
    correct = 0
    for row, pred in zip(QA_ROWS, out["predictions"]):
        theirs = _oracle_loglik(hf, sp, tmpl, row)
        assert pred["id"] == row["id"] and pred["gold"] == row["answer"] and pred["options"] == row["options"]
        assert pred["option_scores"] == pytest.approx(theirs, abs=1e-4, rel=0)
        choice = row["options"][max(range(len(theirs)), key=lambda i: (theirs[i], -i))]
        assert pred["loglik_choice"] == choice
        assert pred["loglik_correct"] == (choice == row["answer"])
        correct += choice == row["answer"]
    assert out["n"] == len(QA_ROWS)
    assert out["loglik_correct"] == correct
    assert out["loglik_accuracy"] == pytest.approx(100.0 * correct / len(QA_ROWS))


# A template whose response split sits inside the instruction, so that what
# follows it (rest of the instruction, then the generated text) holds answers
# that parse, parse wrong, or fail; the last rows' regex needs a generated
# character after the letter.
TEMPLATE = dict(name="probe", prompt_input="### Instruction:\n{instruction}\n{input}",
                prompt_no_input="### Instruction:\n{instruction}", response_split="Reply:")
GEN_ROWS = [
    dict(id="g0", instruction="Which? Reply: The answer is B.", answer="B"),              # correct
    dict(id="g1", instruction="Which? Reply: The answer is C. Sure.", answer="A"),        # wrong
    dict(id="g2", instruction="Reply: The answer is A. The answer is A.", answer="A"),    # two matches: FAILED
    dict(id="g3", instruction="Reply: the answer is b.", answer="B"),                    # lower case: FAILED
    dict(id="g4", instruction="No marker here. The answer is D.", answer="D"),           # no split: FAILED
    dict(id="g5", instruction="Reply: The answer is E!", input="context", answer="E"),   # any char: correct
    dict(id="g6", instruction="Reply: The answer is D", input="more", answer="D"),       # newline next: FAILED
    dict(id="g7", instruction="Pick. Reply: The answer is A", answer="A"),               # next char generated
    dict(id="g8", instruction="Reply: The answer is", answer="C"),                       # letter generated
]


def _oracle_generate(hf, sp, rows, batch_size):
    responses = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        prompts = [[BOS] + sp.encode(_prompt(TEMPLATE, r)) for r in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD,
                              eos_token_id=EOS)
        for p, seq in zip(prompts, out[:, width:].tolist()):
            new = seq[:seq.index(EOS)] if EOS in seq else seq
            text = sp.decode([t for t in p + new if t not in (BOS, EOS, PAD)])
            parts = text.split(TEMPLATE["response_split"])  # Prompter.get_response
            responses.append(parts[1].strip() if len(parts) > 1 else "")
    return responses


def test_generation_accuracy_equals_the_oracle(checkpoint, sp):
    hf, model = checkpoint
    out = _C.evaluate(model, str(TOKENIZER), _C.PromptTemplate(**TEMPLATE), GEN_ROWS,
                      dict(methods=["generate"], batch_size=4, max_new_tokens=NEW), return_predictions=True)
    responses = _oracle_generate(hf, sp, GEN_ROWS, 4)
    correct = failed = 0
    for row, pred, response in zip(GEN_ROWS, out["predictions"], responses):
        assert pred["response"] == response, row["id"]
        found = re.findall(r"The answer is ([A-Z]).", response)
        parsed = found[0] if len(found) == 1 else None
        assert pred["parsed"] == parsed, (row["id"], response)
        failed += parsed is None
        correct += parsed == row["answer"]
    assert (out["generate_correct"], out["generate_failed"]) == (correct, failed)
    assert out["generate_accuracy"] == pytest.approx(100.0 * correct / len(GEN_ROWS))
    # The hand-made rows decide these whatever the model generates.
    by_id = {p["id"]: p for p in out["predictions"]}
    assert by_id["g1"]["parsed"] == "C" and not by_id["g1"]["generate_correct"]
    assert by_id["g2"]["parsed"] is None and by_id["g3"]["parsed"] is None and by_id["g4"]["parsed"] is None
    assert by_id["g6"]["parsed"] is None
    assert 2 <= correct and 4 <= failed


def test_generation_batch_size_does_not_change_the_result(checkpoint):
    hf, model = checkpoint
    tmpl = _C.PromptTemplate(**TEMPLATE)
    runs = [_C.evaluate(model, str(TOKENIZER), tmpl, GEN_ROWS, dict(methods=["generate"], batch_size=b,
                                                                    max_new_tokens=NEW), return_predictions=True)
            for b in (1, 8)]
    assert runs[0] == runs[1]


def test_both_methods_max_examples_and_the_file_forms(checkpoint, sp):
    hf, model = checkpoint
    out = _C.evaluate(model, str(TOKENIZER), str(ALPACA), QA_ROWS, dict(max_examples=3, max_new_tokens=4))
    assert out["n"] == 3
    assert {"generate_accuracy", "generate_correct", "generate_failed", "loglik_accuracy", "loglik_correct"} <= set(out)
    assert 0 <= out["generate_correct"] + out["generate_failed"] <= 3
    assert out["majority_answer"] == "B" and out["majority_accuracy"] == pytest.approx(200.0 / 3)  # A, B, B


def test_parse_answer_is_pythons_findall_with_one_match():
    cases = ["The answer is B.", "", "The answer is A. The answer is A.", "the answer is b.", "The answer is C",
             "The answer is D!", "Answer: The answer is E.\nDone", "The answer is F\n.", "The answer is G\r",
             "The answer is AB.", "The answer is Ä.", "The answer is H€ and The answer is", "The answer is  I."]
    for text in cases:
        found = re.findall(r"The answer is ([A-Z]).", text)
        assert _C.parse_answer(text) == (found[0] if len(found) == 1 else None), repr(text)


def test_majority_baseline():
    rows = [dict(answer=a) for a in "BABCAB"]
    assert _C.majority_baseline(rows) == ("B", pytest.approx(50.0))
    assert _C.majority_baseline([dict(answer="B"), dict(answer="A")]) == ("A", pytest.approx(50.0))  # ties: first


def test_errors(checkpoint):
    hf, model = checkpoint
    tok, tmpl = str(TOKENIZER), str(ALPACA)
    with pytest.raises(ValueError, match="no rows"):
        _C.evaluate(model, tok, tmpl, [])
    with pytest.raises(ValueError, match=r"row 1 \(id \"b\"\) has no answer"):
        _C.evaluate(model, tok, tmpl, [dict(id="a", instruction="x", answer="A", options=["A"]),
                                       dict(id="b", instruction="y")])
    with pytest.raises(ValueError, match="has no options"):
        _C.evaluate(model, tok, tmpl, [dict(instruction="x", answer="A")], dict(methods=["loglik"]))
    with pytest.raises(ValueError, match="not one of its options"):
        _C.evaluate(model, tok, tmpl, [dict(instruction="x", answer="C", options=["A", "B"])])
    with pytest.raises(ValueError, match='did you mean "max_new_tokens"'):
        _C.evaluate(model, tok, tmpl, QA_ROWS, dict(max_new_token=3))
    with pytest.raises(ValueError, match='did you mean "loglik"'):
        _C.EvalOptions(methods=["logilk"])
    with pytest.raises(ValueError, match="batch_size"):
        _C.EvalOptions(batch_size=0)
    assert _C.EvalOptions().to_json() == dict(batch_size=8, max_new_tokens=128, max_examples=0,
                                              methods=["generate", "loglik"])
