"""Recipes (docs/recipes.md): every bundled recipe under configs/recipes is what
make_recipes.py writes and validates without weights (all sections parsed
strictly by the C++ loader); --set overrides keep types; bad recipes give
errors that name the key and the nearest valid one.
C++: src/train/recipe.cpp; Python: mola.recipes.load_recipe.
"""
import json
import pathlib
import subprocess
import sys

import pytest

import mola

ROOT = pathlib.Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*/*.json"))
TINY = ROOT / "configs" / "recipes" / "tiny" / "scienceqa-2468.json"


def test_the_files_are_what_the_generator_writes():
    result = subprocess.run([sys.executable, str(ROOT / "configs" / "recipes" / "make_recipes.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_family_task_and_preset_is_there():
    names = {p.relative_to(ROOT / "configs" / "recipes").as_posix() for p in RECIPES}
    for family in ("llama-2-7b", "mistral-7b", "gemma-7b", "gemma-2b", "tiny"):
        for task in ("scienceqa", "commonsense_qa", "openbookqa", "mrpc", "cola", "rte"):
            for preset in ("5555", "8888", "8642", "2468", "8228", "2882", "lora64", "molex-lora", "molex-mola"):
                assert f"{family}/{task}-{preset}.json" in names
        assert f"{family}/instruction-2468.json" in names
        assert f"{family}/scienceqa-2468-after-instruction.json" in names
        assert f"{family}/scienceqa-continual-2468.json" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_validates(path):
    recipe = mola.recipes.load_recipe(str(path))
    raw = json.loads(path.read_text())
    assert recipe == raw
    assert raw["comment"].startswith(f"mola train configs/recipes/{path.parent.name}/{path.name}")
    # The data files a recipe names are bundled (the instruction stage's OpenOrca is the user's).
    for key in ("train", "test"):
        if key in raw["data"] and "openorca" not in raw["data"][key] and "scienceqa-full" not in raw["data"][key]:
            assert (ROOT / raw["data"][key]).exists(), raw["data"][key]
    if raw["model"]["path"].startswith("data/"):
        assert (ROOT / raw["model"]["path"] / "config.json").exists()


def test_overrides_keep_the_types():
    r = mola.recipes.load_recipe(str(TINY), ["train.lr=1e-4", "adapter.experts=8642", "train.group_by_length=true",
                                     "data.cutoff_len=128", "output_dir=/tmp/x", "eval.max_examples=5"])
    assert r["train"]["lr"] == 1e-4 and r["adapter"]["experts"] == "8642"
    assert r["train"]["group_by_length"] is True and r["data"]["cutoff_len"] == 128
    assert r["output_dir"] == "/tmp/x" and r["eval"]["max_examples"] == 5
    # A dict works as mola.recipes.train's overrides.
    r = mola.recipes.load_recipe(str(TINY), {"train.epochs": 1, "adapter.top_k": 1})
    assert r["train"]["epochs"] == 1 and r["adapter"]["top_k"] == 1


def test_set_takes_json_values():
    # A list for a key that holds a preset string, from --set and from a dict.
    r = mola.recipes.load_recipe(str(TINY), ["adapter.experts=[2,2,4,6,8]", 'eval.methods=["loglik"]', "output_dir=2024",
                                     "train.resume=true", "model.dtype=bfloat16"])
    assert r["adapter"]["experts"] == [2, 2, 4, 6, 8] and r["eval"]["methods"] == ["loglik"]
    assert r["output_dir"] == "2024" and r["train"]["resume"] is True and r["model"]["dtype"] == "bfloat16"
    r = mola.recipes.load_recipe(str(TINY), {"adapter.experts": [2, 2, 3, 4, 5], "train.group_by_length": True})
    assert r["adapter"]["experts"] == [2, 2, 3, 4, 5] and r["train"]["group_by_length"] is True
    assert mola.recipes.load_recipe(str(TINY), ["adapter.experts=2468"])["adapter"]["experts"] == "2468"


@pytest.mark.parametrize("override, message", [
    ("train.group_by_length=False", "'False' is not a JSON value; write false"),
    ("train.resume=True", "'True' is not a JSON value; write true"),
    ("train.lrr=1", "'train'.*unknown key .lrr.; did you mean .lr."),
    ("trian.lr=1", "unknown section 'trian'.*did you mean 'train'"),
    ("data.cutoff_len=1", "cutoff_len.*>= 2"),
    ("model.dtype=float8", "model.dtype.*float32, bfloat16 or float16"),
    ("model.quantize=nf5", "model.quantize.*none, nf4 or int8.*did you mean 'nf4'"),
    ("train.micro_batch_size=7", "micro_batch_size"),
    ("adapter.top_k=9", "top_k"),
    ("data.task=sciencqa", "did you mean 'scienceqa'"),
    ("eval.batch_sise=2", "'eval'.*batch_sise.*did you mean .batch_size."),
    ("train.lr", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        mola.recipes.load_recipe(str(TINY), [override])


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"path": "x"},')
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        mola.recipes.load_recipe(str(bad))
    with pytest.raises(ValueError, match="cannot open.*missing.json"):
        mola.recipes.load_recipe(str(tmp_path / "missing.json"))
    bad.write_text(json.dumps({"model": {"path": "x", "config": "y"}}))
    with pytest.raises(ValueError, match="exactly one of 'model.path'"):
        mola.recipes.load_recipe(str(bad))
    bad.write_text(json.dumps({"model": {"path": "x"}, "outputdir": "o"}))
    with pytest.raises(ValueError, match="unknown key 'outputdir'.*did you mean 'output_dir'"):
        mola.recipes.load_recipe(str(bad))


def test_continual_metrics_are_the_papers_formulas():
    # R[t][i]: accuracy on domain i after training through domain t.
    r = [[80.0, 10.0, 20.0],
         [70.0, 85.0, 30.0],
         [75.0, 80.0, 90.0]]
    op, pd = mola._C.continual_metrics(r)
    assert op == pytest.approx((75 + 80 + 90) / 3)
    # 2 / (T (T-1)) * [(R10 - R00) + (R20 - R10) + (R21 - R11)]
    assert pd == pytest.approx(2 / 6 * ((70 - 80) + (75 - 70) + (80 - 85)))
    with pytest.raises(ValueError, match="T x T"):
        mola._C.continual_metrics([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="domains.*two or more"):
        mola.recipes.load_recipe(str(TINY), ['data.domains=["biology"]'])
