"""Tests for mola's data pipeline (mola._C: Tokenizer, PromptTemplate, load_rows, tokenize_row).

Oracles, all independent of mola's C++:
- sentencepiece's Python package for every token id (llama2, mistral, and the stories260K 512-piece model),
  and transformers' SentencePiece tokenizer for the llama2 model;
- a plain-Python copy of the authors' Prompter (MoLA utils/prompter.py) and generate_and_tokenize_prompt
  (MoLA mola_training.py, from alpaca-lora finetune.py), tokenising with sentencepiece Python the way
  transformers' LlamaTokenizer(truncation=True, max_length=cutoff_len) does;
- a Python re-implementation of the task conversions (src/data/tasks.cpp's header), run over every row of
  every bundled file, plus a few rows written out by hand.
Files are found relative to the repository (data/...).
"""
import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

import mola  # noqa: F401  (loads torch and libmola first)
from mola import _C

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "data"
TEMPLATE = DATA / "templates" / "alpaca.json"
LLAMA2 = DATA / "tokenizers" / "llama2" / "tokenizer.model"
MISTRAL = DATA / "tokenizers" / "mistral" / "tokenizer.model"
# stories260K's tokenizer, bundled in data/checkpoints.
TOK512 = DATA / "checkpoints" / "stories260K" / "tok512.model"
TOK512 = TOK512 if TOK512.is_file() else None

TASK_FILES = {  # task -> {split: rows}, as data/README.md lists them
    "scienceqa": {"train": 200, "validation": 200, "test": 200},
    "commonsense_qa": {"train": 9741, "validation": 1221},
    "openbookqa": {"train": 4957, "test": 500},
    "mrpc": {"train": 3668, "validation": 408, "test": 1725},
    "cola": {"train": 8551, "validation": 1043},
    "rte": {"train": 2490, "validation": 277},
}
ALL_FILES = [(t, s) for t, splits in TASK_FILES.items() for s in splits]


def task_file(task, split):
    return DATA / "tasks" / task / f"{split}.jsonl"


def raw_rows(task, split):
    with open(task_file(task, split), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- the authors' code, as plain Python (the oracle) ---------------------------------------------------

class Prompter:
    """MoLA utils/prompter.py, with the template read from a path."""

    def __init__(self, path):
        with open(path) as fp:
            self.template = json.load(fp)

    def generate_prompt(self, instruction, input=None, label=None):
        if input:
            res = self.template["prompt_input"].format(instruction=instruction, input=input)
        else:
            res = self.template["prompt_no_input"].format(instruction=instruction)
        if label:
            res = f"{res}{label}"
        return res

    def get_response(self, output):
        return output.split(self.template["response_split"])[1].strip()


def authors_generate_and_tokenize_prompt(data_point, prompter, sp, cutoff_len, train_on_inputs, add_eos_token):
    """mola_training.py's tokenize + generate_and_tokenize_prompt. LlamaTokenizer(prompt, truncation=True,
    max_length=cutoff_len) is [bos] + sentencepiece ids, cut to cutoff_len."""
    def tokenize(prompt, add_eos_token=True):
        input_ids = ([sp.bos_id()] + sp.encode(prompt))[:cutoff_len]
        if input_ids[-1] != sp.eos_id() and len(input_ids) < cutoff_len and add_eos_token:
            input_ids.append(sp.eos_id())
        return {"input_ids": input_ids, "labels": input_ids.copy()}

    full_prompt = prompter.generate_prompt(data_point["instruction"], data_point["input"], data_point["output"])
    # The authors write tokenize(full_prompt), whose default add_eos_token is True, so their flag only changes
    # the masking below; they always ran with True, where both readings agree. mola applies the flag to the
    # full text as well (docs/recipes.md: EOS appended when it fits), hence the argument here.
    tokenized_full_prompt = tokenize(full_prompt, add_eos_token=add_eos_token)
    if not train_on_inputs:
        user_prompt = prompter.generate_prompt(data_point["instruction"], data_point["input"])
        tokenized_user_prompt = tokenize(user_prompt, add_eos_token=add_eos_token)
        user_prompt_len = len(tokenized_user_prompt["input_ids"])
        if add_eos_token:
            user_prompt_len -= 1
        tokenized_full_prompt["labels"] = [-100] * user_prompt_len + tokenized_full_prompt["labels"][user_prompt_len:]
    return tokenized_full_prompt


# --- fixtures ----------------------------------------------------------------------------------------

TOKENIZER_MODELS = [pytest.param(LLAMA2, id="llama2"), pytest.param(MISTRAL, id="mistral"),
                    pytest.param(TOK512, id="stories260K-tok512",
                                 marks=pytest.mark.skipif(TOK512 is None, reason="tok512.model not found in "
                                                          "data/checkpoints"))]


@pytest.fixture(scope="module")
def llama2():
    return _C.Tokenizer.from_file(LLAMA2), spm.SentencePieceProcessor(model_file=str(LLAMA2))


@pytest.fixture(scope="module")
def alpaca():
    return _C.PromptTemplate.from_json_file(TEMPLATE), Prompter(TEMPLATE)


def sample_rows(task, split, k=4):
    """A few converted rows of a file: the first k and k spread through it."""
    rows = _C.load_rows(task_file(task, split))
    step = max(1, len(rows) // k)
    return rows[:k] + rows[k::step][:k]


def real_prompts():
    t = Prompter(TEMPLATE)
    out = []
    for task in TASK_FILES:
        r = _C.load_rows(task_file(task, next(iter(TASK_FILES[task]))))[0]
        out.append(t.generate_prompt(r.instruction, r.input, r.output))
    return out


TEXTS = [
    "Hello world", "hello", "", " ", "  ", "a", " leading space", "trailing space ", "double  spaces  here",
    "  two leading", "tabs\tand\ttabs", "new\nline", "\n\nstarts with newlines", "ends with newline\n",
    "digits 0123456789 and 3.14159, 1,000,000", "ASCII punctuation: !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية", "emoji 🤗🚀👍🏽 👨‍👩‍👧",
    "zero\u200bwidth and nbsp\u00a0here", "<s> and </s> are plain text here", "<unk>", "### Response:",
    "Answer: The answer is B.", "x" * 300, "word " * 80,
] + real_prompts()


# --- Tokenizer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", TOKENIZER_MODELS)
def test_encode_matches_sentencepiece(model):
    tok = _C.Tokenizer.from_file(model)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for text in TEXTS:
        expected = sp.encode(text)
        assert tok.encode(text) == [sp.bos_id()] + expected, repr(text)
        assert tok.encode(text, add_bos=False) == expected, repr(text)
        assert tok.encode(text, add_bos=True, add_eos=True) == [sp.bos_id()] + expected + [sp.eos_id()], repr(text)


@pytest.mark.parametrize("model", TOKENIZER_MODELS)
def test_decode_matches_sentencepiece_skipping_specials(model):
    tok = _C.Tokenizer.from_file(model)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    specials = {sp.bos_id(), sp.eos_id(), sp.pad_id() if sp.pad_id() >= 0 else 0}
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.decode([sp.bos_id()] + ids + [sp.eos_id()]) == sp.decode(ids), repr(text)
        # Left padding (pad id 0) and an EOS inside a generated batch row are skipped too.
        padded = [0, 0, sp.bos_id()] + ids[: len(ids) // 2] + [sp.eos_id()] + ids[len(ids) // 2:]
        assert tok.decode(padded) == sp.decode([i for i in padded if i not in specials]), repr(text)


@pytest.mark.parametrize("model", TOKENIZER_MODELS)
def test_special_ids_and_vocab(model):
    tok = _C.Tokenizer.from_file(model)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert (tok.bos_id(), tok.eos_id(), tok.vocab_size()) == (sp.bos_id(), sp.eos_id(), sp.get_piece_size())
    assert tok.pad_id() == (sp.pad_id() if sp.pad_id() >= 0 else 0)
    assert len(tok) == sp.get_piece_size()


def test_known_ids_llama2(llama2):
    tok, _ = llama2
    # The LLaMA-2 vocabulary: <unk> 0, <s> 1, </s> 2; "▁Hello" 15043, "▁world" 3186 (data/README.md).
    assert (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.vocab_size()) == (1, 2, 0, 32000)
    assert tok.encode("Hello world") == [1, 15043, 3186]


def test_transformers_slow_sentencepiece_tokenizer_matches(llama2):
    """transformers' SentencePiece tokenizer (the code path of the LlamaTokenizer the authors used: legacy, BOS
    added) built from the llama2 tokenizer.model."""
    sp_backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    tok, _ = llama2
    hf = sp_backend.SentencePieceBackend(vocab_file=str(LLAMA2), bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>", legacy=True, special_tokens_pattern="bos")
    for text in TEXTS:
        if "<s>" in text or "</s>" in text or "<unk>" in text:
            continue  # transformers parses special-token strings in text; mola (like sentencepiece) does not
        assert tok.encode(text) == hf(text)["input_ids"], repr(text)


def test_transformers_llama_tokenizer_matches(tmp_path, llama2):
    """transformers' LlamaTokenizer (v5: tokenizers-based, converted from tokenizer.model) on plain text."""
    transformers = pytest.importorskip("transformers")
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        pytest.skip("protobuf is not installed: transformers needs it to convert tokenizer.model to LlamaTokenizer")
    tok, _ = llama2
    shutil.copy(LLAMA2, tmp_path / "tokenizer.model")
    try:
        hf = transformers.LlamaTokenizer.from_pretrained(tmp_path)
    except Exception as e:  # noqa: BLE001  (any failure to build it offline is a skip, with the reason)
        pytest.skip(f"LlamaTokenizer cannot be built offline from tokenizer.model here: {str(e).splitlines()[0]}")
    for text in TEXTS:
        if "<s>" in text or "</s>" in text or "<unk>" in text:
            continue
        assert tok.encode(text) == hf(text)["input_ids"], repr(text)


def test_tokenizer_errors(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        _C.Tokenizer.from_file(missing)
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        _C.Tokenizer.from_file(tmp_path)  # a directory without tokenizer.model
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*not a SentencePiece model"):
        _C.Tokenizer.from_file(bad)
    tok = _C.Tokenizer.from_file(LLAMA2)
    with pytest.raises(ValueError, match="id 32000 at position 1 is outside"):
        tok.decode([1, 32000])
    with pytest.raises(ValueError, match="id -5"):
        tok.decode([-5])


def test_tokenizer_from_directory(tmp_path):
    shutil.copy(MISTRAL, tmp_path / "tokenizer.model")
    tok = _C.Tokenizer.from_file(tmp_path)
    assert tok.path == str(tmp_path / "tokenizer.model")
    assert tok.encode("Hi there") == _C.Tokenizer.from_file(MISTRAL).encode("Hi there")


# --- PromptTemplate ----------------------------------------------------------------------------------

def test_template_fields(alpaca):
    t, p = alpaca
    assert t.name == "alpaca"
    assert (t.prompt_input, t.prompt_no_input, t.response_split) == (
        p.template["prompt_input"], p.template["prompt_no_input"], p.template["response_split"])


@pytest.mark.parametrize("task,split", ALL_FILES)
def test_prompt_matches_prompter(alpaca, task, split):
    t, p = alpaca
    for r in sample_rows(task, split):
        assert t.prompt(r.instruction, r.input, r.output) == p.generate_prompt(r.instruction, r.input, r.output)
        assert t.prompt(r.instruction, r.input) == p.generate_prompt(r.instruction, r.input)
        # The input form, with an input the bundled tasks never have.
        assert t.prompt(r.instruction, "some {input}", r.output) == p.generate_prompt(r.instruction, "some {input}",
                                                                                         r.output)


def test_prompt_by_hand(alpaca):
    t, _ = alpaca
    assert t.prompt("Say hi.", "", "Hi!") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\nHi!")
    assert t.prompt("Add.", "2 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write "
        "a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 3\n\n"
        "### Response:\n")


def test_response_matches_prompter(alpaca):
    t, p = alpaca
    for text in [t.prompt("Q?", "", "Answer: The answer is C."), "x ### Response:  A \n", "### Response:\u3000B\u00a0",
                 "a ### Response: first ### Response: second", "### Response:"]:
        assert t.response(text) == p.get_response(text), repr(text)
    # The authors raise IndexError without the marker; mola returns "" (no answer, scored as failed).
    assert t.response("no marker here") == ""


def test_raw_template():
    raw = _C.PromptTemplate.raw()
    assert raw.name == "raw"
    assert raw.prompt("", "", "Question?\nAnswer.") == "Question?\nAnswer."  # the authors' instruction-stage rows
    assert raw.prompt("Do it.", "", " Done.") == "Do it. Done."
    assert raw.prompt("Do it.", "with this") == "Do it.\nwith this"
    assert raw.response("  the whole text \n") == "the whole text"


def test_template_errors(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        _C.PromptTemplate.from_json_file(missing)
    base = json.loads(TEMPLATE.read_text())
    for key in ("prompt_input", "prompt_no_input", "response_split"):
        f = tmp_path / f"no_{key}.json"
        f.write_text(json.dumps({k: v for k, v in base.items() if k != key}))
        with pytest.raises(ValueError, match=re.escape(str(f)) + f'.*missing key "{key}"'):
            _C.PromptTemplate.from_json_file(f)
    f = tmp_path / "typed.json"
    f.write_text(json.dumps({**base, "response_split": 3}))
    with pytest.raises(ValueError, match='"response_split" must be a string'):
        _C.PromptTemplate.from_json_file(f)
    f = tmp_path / "placeholder.json"
    f.write_text(json.dumps({**base, "prompt_no_input": "{instruction} {input}"}))
    with pytest.raises(ValueError, match=re.escape(str(f)) + r'.*prompt_no_input.*\{input\}'):
        _C.PromptTemplate.from_json_file(f)
    f = tmp_path / "broken.json"
    f.write_text('{"prompt_input": ')
    with pytest.raises(ValueError, match=re.escape(str(f)) + ".*not valid JSON"):
        _C.PromptTemplate.from_json_file(f)
    # Python's str.format escapes: {{ and }} are literal braces.
    f = tmp_path / "braces.json"
    f.write_text(json.dumps({**base, "prompt_no_input": "{{x}} {instruction}"}))
    assert _C.PromptTemplate.from_json_file(f).prompt("I") == "{x} I" == "{{x}} {instruction}".format(instruction="I")


# --- tokenize_row --------------------------------------------------------------------------------------

def check_against_authors(rows, tok, sp, template, prompter, cutoff_len, train_on_inputs, add_eos_token):
    opts = _C.DataOptions(cutoff_len=cutoff_len, train_on_inputs=train_on_inputs, add_eos_token=add_eos_token)
    got = _C.tokenize_rows(rows, template, tok, opts)
    for r, ex in zip(rows, got):
        want = authors_generate_and_tokenize_prompt(
            {"instruction": r.instruction, "input": r.input, "output": r.output}, prompter, sp, cutoff_len,
            train_on_inputs, add_eos_token)
        assert ex.input_ids == want["input_ids"], (r.id, cutoff_len)
        assert ex.labels == want["labels"], (r.id, cutoff_len)
        single = _C.tokenize_row(r, template, tok, opts)
        assert (single.input_ids, single.labels) == (ex.input_ids, ex.labels)


@pytest.mark.parametrize("task", list(TASK_FILES))
@pytest.mark.parametrize("train_on_inputs", [True, False])
@pytest.mark.parametrize("add_eos_token", [True, False])
def test_tokenize_row_matches_authors(llama2, alpaca, task, train_on_inputs, add_eos_token):
    tok, sp = llama2
    template, prompter = alpaca
    rows = sample_rows(task, next(iter(TASK_FILES[task])))
    for cutoff in (256, 96, 40, 2):  # 96 and 40 are shorter than every prompt; 2 keeps BOS and one token
        check_against_authors(rows, tok, sp, template, prompter, cutoff, train_on_inputs, add_eos_token)


@pytest.mark.parametrize("train_on_inputs", [True, False])
def test_eos_at_and_past_the_cutoff(llama2, alpaca, train_on_inputs):
    tok, sp = llama2
    template, prompter = alpaca
    row = _C.load_rows(task_file("rte", "validation"))[0]
    n = len(tok.encode(template.prompt(row.instruction, row.input, row.output)))  # BOS + text, no EOS
    n_user = len(tok.encode(template.prompt(row.instruction, row.input)))
    for cutoff in (n - 1, n, n + 1, n + 2, n_user - 1, n_user, n_user + 1):
        check_against_authors([row], tok, sp, template, prompter, cutoff, train_on_inputs, True)
    opts = lambda c: _C.DataOptions(cutoff_len=c, train_on_inputs=train_on_inputs)  # noqa: E731
    # Room for EOS only past the text: at cutoff n the text fills it and no EOS is added.
    assert _C.tokenize_row(row, template, tok, opts(n + 1)).input_ids[-1] == tok.eos_id()
    assert len(_C.tokenize_row(row, template, tok, opts(n + 1)).input_ids) == n + 1
    assert tok.eos_id() not in _C.tokenize_row(row, template, tok, opts(n)).input_ids
    assert len(_C.tokenize_row(row, template, tok, opts(n - 1)).input_ids) == n - 1
    if not train_on_inputs:
        # The prompt alone fills the cutoff: the authors still subtract the EOS that did not fit, so the last
        # token keeps its label.
        ex = _C.tokenize_row(row, template, tok, opts(n_user))
        assert ex.labels == [-100] * (n_user - 1) + ex.input_ids[-1:]
        # With room: every prompt token masked, the answer and EOS trained.
        ex = _C.tokenize_row(row, template, tok, opts(256))
        assert ex.labels == [-100] * n_user + ex.input_ids[n_user:]
        assert tok.decode(ex.input_ids[n_user:]) == row.output == "Answer: The answer is B."  # label 1


def test_tokenize_row_mistral(alpaca):
    template, prompter = alpaca
    tok = _C.Tokenizer.from_file(MISTRAL)
    sp = spm.SentencePieceProcessor(model_file=str(MISTRAL))
    rows = sample_rows("commonsense_qa", "validation") + sample_rows("scienceqa", "test")
    for train_on_inputs in (True, False):
        check_against_authors(rows, tok, sp, template, prompter, 128, train_on_inputs, True)


def test_tokenize_row_rejects_small_cutoff(llama2, alpaca):
    tok, _ = llama2
    row = _C.Row(instruction="x", output="y")
    for cutoff in (1, 0, -3):
        with pytest.raises(ValueError, match=f"cutoff_len is {cutoff}, but it must be >= 2"):
            _C.tokenize_row(row, alpaca[0], tok, _C.DataOptions(cutoff_len=cutoff))
        with pytest.raises(ValueError, match="cutoff_len"):
            _C.tokenize_rows([], alpaca[0], tok, _C.DataOptions(cutoff_len=cutoff))


def test_row_and_options_from_python():
    r = _C.Row(id="r1", instruction="Q", input="I", output="O", answer="A", options=["A", "B"])
    assert (r.id, r.instruction, r.input, r.output, r.answer, r.options) == ("r1", "Q", "I", "O", "A", ["A", "B"])
    r.answer = "B"
    assert r.answer == "B" and r == _C.Row(id="r1", instruction="Q", input="I", output="O", answer="B",
                                           options=["A", "B"])
    o = _C.DataOptions()
    assert (o.cutoff_len, o.train_on_inputs, o.add_eos_token) == (256, True, True)  # the authors' defaults
    o.cutoff_len = 64
    assert o.cutoff_len == 64


# --- load_rows: conversions ----------------------------------------------------------------------------

def test_converted_rows_by_hand():
    def first(task, split, i=0):
        return _C.load_rows(task_file(task, split))[i]

    r = first("rte", "validation", 1)
    assert r.instruction == (
        "Context: Premise: Yet, we now are discovering that antibiotics are losing their effectiveness against "
        "illness. Disease-causing bacteria are mutating faster than we can come up with new antibiotics to fight "
        "the new variations. Hypothesis: Bacteria is winning the war against antibiotics.\n"
        "Question: Does the premise entail the hypothesis?\nOptions: (A) yes (B) no\n")
    assert (r.id, r.input, r.output, r.answer, r.options) == (
        "rte-validation-1", "", "Answer: The answer is A.", "A", ["A", "B"])  # label 0: entailment
    # Double spaces ("Malval  murdered") collapse.
    assert "Robert Malval murdered in Port-au-Prince.\nQuestion:" in first("rte", "train", 7).instruction

    r = first("cola", "validation", 4)
    assert r.instruction == ("Context: Sentence: As you eat the most, you want the least.\n"
                             "Question: Is the sentence grammatically acceptable?\nOptions: (A) yes (B) no\n")
    assert (r.output, r.answer) == ("Answer: The answer is B.", "B")  # label 0: unacceptable

    r = first("mrpc", "train")
    assert r.instruction == (
        'Context: Sentence 1: Amrozi accused his brother , whom he called " the witness " , of deliberately '
        'distorting his evidence . Sentence 2: Referring to him as only " the witness " , Amrozi accused his '
        'brother of deliberately distorting his evidence .\nQuestion: Do the two sentences have the same meaning?\n'
        "Options: (A) yes (B) no\n")
    assert (r.id, r.answer) == ("mrpc-train-0", "A")  # label 1: equivalent

    r = first("openbookqa", "test", 2)
    assert r.instruction == ("Context: N/A\nQuestion: Predators eat\n"
                             "Options: (A) lions (B) humans (C) bunnies (D) grass\n")
    assert (r.id, r.output, r.answer, r.options) == ("880", "Answer: The answer is C.", "C", ["A", "B", "C", "D"])

    r = first("commonsense_qa", "train")
    assert r.instruction == (
        "Context: N/A\nQuestion: The sanctions against the school were a punishing blow, and they seemed to what "
        "the efforts the school had made to change?\nOptions: (A) ignore (B) enforce (C) authoritarian (D) yell at "
        "(E) avoid\n")
    assert (r.id, r.answer, r.options) == ("075e483d21c29a511267ef62bedc0461", "A", ["A", "B", "C", "D", "E"])

    r = first("scienceqa", "train")
    assert r.instruction == (
        "Context: Read the description of a trait.\nLogan has blue eyes.\nQuestion: What information supports the "
        "conclusion that Logan inherited this trait?\nOptions: (A) Logan's mother has blue eyes. She passed this "
        "trait down to Logan. (B) Logan likes to wear a blue sweater to match his blue eyes.\n")
    assert (r.id, r.input, r.output, r.answer, r.options) == (
        "scienceqa-train-0", "", "Answer: The answer is A.", "A", ["A", "B"])


def expected_row(task, j):
    """The conversion rules of src/data/tasks.cpp, written again in Python: (instruction, answer, options)."""
    def cqm(context, question, choices):
        opts = " ".join(f"({label}) {text}" for label, text in choices)
        return re.sub(" {2,}", " ", f"Context: {context}\nQuestion: {question}\nOptions: {opts}\n")

    yes_no = [("A", "yes"), ("B", "no")]
    if task == "scienceqa":
        # The file's own instruction, which is the authors' CQM format of the raw fields.
        letters = [chr(ord("A") + i) for i in range(len(j["choices"]))]
        opts = " ".join(f"({L}) {c}" for L, c in zip(letters, j["choices"]))
        assert j["instruction"] == f"Context: {j['hint'] or 'N/A'}\nQuestion: {j['question']}\nOptions: {opts}\n"
        return j["instruction"], j["answer"], letters
    if task in ("commonsense_qa", "openbookqa"):
        choices = [(c["label"], c["text"]) for c in j["choices"]]
        assert j["answer"] == choices[j["label"]][0]
        return cqm("N/A", j["question"], choices), j["answer"], [c[0] for c in choices]
    if task == "mrpc":
        return (cqm(f"Sentence 1: {j['sentence1']} Sentence 2: {j['sentence2']}",
                    "Do the two sentences have the same meaning?", yes_no),
                "A" if j["label"] == 1 else "B", ["A", "B"])
    if task == "rte":
        return (cqm(f"Premise: {j['sentence1']} Hypothesis: {j['sentence2']}",
                    "Does the premise entail the hypothesis?", yes_no),
                "A" if j["label"] == 0 else "B", ["A", "B"])
    assert task == "cola"
    return (cqm(f"Sentence: {j['sentence']}", "Is the sentence grammatically acceptable?", yes_no),
            "A" if j["label"] == 1 else "B", ["A", "B"])


@pytest.mark.parametrize("task,split", ALL_FILES)
def test_every_bundled_row_converts(task, split):
    raw = raw_rows(task, split)
    rows = _C.load_rows(task_file(task, split))
    assert len(rows) == len(raw) == TASK_FILES[task][split]
    assert rows == _C.load_rows(str(task_file(task, split)), task)  # "auto" picks the same converter
    for i, (r, j) in enumerate(zip(rows, raw)):
        instruction, answer, options = expected_row(task, j)
        assert (r.instruction, r.answer, r.options) == (instruction, answer, options), (task, split, i)
        assert r.answer in r.options
        assert r.output == f"Answer: The answer is {r.answer}."
        assert r.input == ""
        assert r.id == j.get("id", f"{task}-{split}-{i}")
        if task != "scienceqa":
            assert "  " not in r.instruction


# --- load_rows: errors (the full matrix is in tests/cpp/data/test_data.cpp) ------------------------------------

def test_load_rows_errors(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        _C.load_rows(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ": no rows"):
        _C.load_rows(empty)
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(raw_rows("cola", "validation")[0])
    bad.write_text(good + "\n" + good + "\n{\"id\": \n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:3: malformed JSON")):
        _C.load_rows(bad)
    bad.write_text(good + "\n" + good.replace('"label": 1', '"label": "1"') + "\n")
    with pytest.raises(ValueError, match=re.escape(f'{bad}:2: field "label" must be the integer 0 or 1')):
        _C.load_rows(bad)
    with pytest.raises(ValueError, match="unknown task \"mrcp\"; valid tasks, nearest first: mrpc, "):
        _C.load_rows(task_file("mrpc", "validation"), "mrcp")
    with pytest.raises(ValueError, match=re.escape(f"{task_file('mrpc', 'validation')}:1") + ".*asked for task \"rte\""):
        _C.load_rows(task_file("mrpc", "validation"), "rte")


def test_instruction_rows(tmp_path):
    f = tmp_path / "instr.jsonl"
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": None, "input": None, "output": "Question?\nAnswer."},  # the authors' OpenOrca rows
            {"id": 7, "instruction": "Pick.", "input": "x", "output": "Answer: The answer is B.", "answer": "B",
             "options": ["A", "B"]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = _C.load_rows(f)
    assert [(r.instruction, r.input, r.output) for r in got] == [
        ("Say hi.", "", "Hi!"), ("", "", "Question?\nAnswer."), ("Pick.", "x", "Answer: The answer is B.")]
    assert [r.id for r in got] == ["instr-0", "instr-1", "7"]
    assert (got[2].answer, got[2].options) == ("B", ["A", "B"])
    assert _C.load_rows(f, "instruction") == got
    assert set(_C.task_names()) == set(TASK_FILES)
