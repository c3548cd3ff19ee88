"""Tests of mola.MoLAConfig and the config functions of mola._C.

The rules live in C++ (tests/cpp/test_config.cpp tests them in depth); these
tests pin what Python users see: the papers' parameter counts, round trips
through the C++ parser, the ValueError messages and resolve() for 32 and 28
layers.
"""

import dataclasses
import json

import pytest

import mola
from mola import MoLAConfig, _C

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA2_7B = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 11008),
    "up_proj": (4096, 11008),
    "down_proj": (11008, 4096),
}


def groups(values, sizes):
    return [v for v, n in zip(values, sizes) for _ in range(n)]


def test_defaults_match_the_authors_scripts():
    c = MoLAConfig()
    assert (c.method, c.experts, c.top_k, c.rank) == ("mola", 8, 2, 8)
    assert (c.alpha, c.dropout, c.aux_loss_coef, c.compute) == (16.0, 0.05, 0.001, "auto")
    assert c.targets == SEVEN
    assert c.to_dict() == json.loads(_C.config_default_json())


@pytest.mark.parametrize("experts, expected", [("5555", 105_635_840), ("8888", 169_017_344), ("4444", 84_508_672)])
def test_llama2_7b_parameter_counts(experts, expected):
    cfg = MoLAConfig(experts=experts, rank=8)
    assert cfg.num_parameters(LLAMA2_7B, 32) == expected
    as_list = [(name, i, o) for name, (i, o) in LLAMA2_7B.items()]
    assert cfg.num_parameters(as_list, num_layers=32) == expected


def test_every_160_expert_preset_costs_the_same_as_5555():
    for preset in mola.config.preset_names():
        assert MoLAConfig(experts=preset).num_parameters(LLAMA2_7B, 32) == 105_635_840, preset


def test_parameter_count_accepts_linear_modules_and_names_missing_targets():
    torch = pytest.importorskip("torch")
    cfg = MoLAConfig(experts=1, top_k=1, rank=2, targets=["q_proj"])
    assert cfg.num_parameters({"q_proj": torch.nn.Linear(10, 20)}, 3) == 3 * (2 * 30 + 10)
    with pytest.raises(ValueError, match=r'no shape is given for target "q_proj".*got: v_proj'):
        cfg.num_parameters({"v_proj": (5, 5)}, 3)
    with pytest.raises(ValueError, match="not \\(name, in_features, out_features\\)"):
        cfg.num_parameters([("q_proj", 10)], 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"experts": "triangle"},
        {"experts": "10-2-2-2", "top_k": [1, 2, 2, 2], "rank": [4, 8, 8, 16]},
        {"experts": list(range(1, 33)), "top_k": 1, "alpha": 32, "dropout": 0.0},
        {"experts": (2, 4, 6, 8), "targets": ("q_proj", "v_proj"), "aux_loss_coef": 0.0, "compute": "grouped"},
    ],
)
def test_python_json_cpp_json_python_round_trip(kwargs):
    cfg = MoLAConfig(**kwargs)
    text = _C.config_normalize(cfg.to_json())
    back = MoLAConfig.from_json(text)
    assert back == cfg
    assert MoLAConfig.from_dict(cfg.to_dict()) == cfg
    assert set(json.loads(text)) == {f.name for f in dataclasses.fields(MoLAConfig)}


def test_spelling_is_kept():
    assert MoLAConfig(experts="triangle").to_dict()["experts"] == "triangle"
    assert MoLAConfig(experts="2, 4, 6, 8").to_dict()["experts"] == "2, 4, 6, 8"
    assert MoLAConfig(experts=(2, 4, 6, 8)).experts == [2, 4, 6, 8]
    assert MoLAConfig(alpha=32).alpha == 32.0
    assert isinstance(MoLAConfig(targets=["q_proj"]).targets, tuple)


def test_files(tmp_path):
    path = tmp_path / "adapter.json"
    cfg = MoLAConfig(experts="inverted", alpha=32)
    text = cfg.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text)
    assert MoLAConfig.from_json(path) == cfg
    assert MoLAConfig.from_json(str(path)) == cfg

    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match="missing.json.*does not exist"):
        MoLAConfig.from_json(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "experts": 8\n  "rank": 4\n}\n')
    with pytest.raises(ValueError, match="broken.json.*not valid JSON.*line 3"):
        MoLAConfig.from_json(broken)
    bad = tmp_path / "bad.json"
    bad.write_text('{"expert": 8}')
    with pytest.raises(ValueError, match="bad.json.*'expert'.*did you mean 'experts'"):
        MoLAConfig.from_json(bad)


@pytest.mark.parametrize(
    "key, nearest", [("experst", "experts"), ("topk", "top_k"), ("aux_loss", "aux_loss_coef"), ("lora_rank", "rank")]
)
def test_unknown_keys_name_the_nearest_key(key, nearest):
    with pytest.raises(ValueError, match=f"unknown key '{key}'; did you mean '{nearest}'"):
        MoLAConfig.from_dict({key: 1})
    with pytest.raises(ValueError, match=f"unknown key '{key}'"):
        MoLAConfig.from_json(json.dumps({key: 1}))
    with pytest.raises(ValueError, match=f'unknown key "{key}"'):
        _C.config_normalize(json.dumps({key: 1}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"experts": 0}, r"experts is 0.*>= 1"),
        ({"experts": [2, -1, 6, 8]}, r"experts\[1\] is -1"),
        ({"experts": "24680"}, r'"24680" has 5 digits, so it is not a preset'),
        ({"experts": "trangle"}, r'unknown preset "trangle"; did you mean "triangle"'),
        ({"experts": "2-4-x-8"}, r'group 3 of "2-4-x-8" \("x"\) is not a whole number'),
        ({"experts": ""}, "empty string is not a preset"),
        ({"experts": 8.5}, "experts must be an integer.*8.5"),
        ({"experts": True}, "experts must be an integer.*true"),
        ({"top_k": "2468"}, 'top_k: "2468" is a string, but presets apply to experts only'),
        ({"rank": "8"}, 'rank: "8" is a string'),
        ({"rank": 0}, "rank is 0"),
        ({"experts": 2, "top_k": 3}, "top_k 3 exceeds experts 2"),
        ({"dropout": 1.0}, "dropout 1 must satisfy 0 <= dropout < 1"),
        ({"dropout": float("nan")}, "dropout must be a number.*nan"),
        ({"alpha": -1}, "alpha -1 must be a finite number > 0"),
        ({"aux_loss_coef": -0.5}, "aux_loss_coef -0.5 must be"),
        ({"targets": []}, "targets is empty"),
        ({"targets": "q_proj"}, "targets must be a list of module names"),
        ({"targets": ["q_proj", "q_proj"]}, 'targets lists "q_proj" twice'),
        ({"method": "molx"}, 'method "molx" is not one of mola, lora, molex; did you mean "molex"'),
        ({"compute": "fast"}, 'compute "fast" is not one of auto, dense, grouped'),
    ],
)
def test_bad_values_raise_value_error_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoLAConfig(**kwargs)


def test_lora_method_is_one_expert():
    cfg = MoLAConfig(method="lora", rank=4)
    assert (cfg.experts, cfg.top_k) == (1, 1)
    assert cfg.resolve(2)["experts"] == [1, 1]
    with pytest.raises(ValueError, match='experts 4 is not allowed with method "lora"'):
        MoLAConfig(method="lora", experts=4)


def test_edits_are_checked_again_on_use():
    cfg = MoLAConfig()
    cfg.rank = 0
    with pytest.raises(ValueError, match="rank is 0"):
        cfg.to_dict()
    with pytest.raises(ValueError, match="rank is 0"):
        dataclasses.replace(MoLAConfig(), rank=0)


def test_resolve_32_and_28_layers():
    cfg = MoLAConfig(experts="triangle", rank=[4, 8, 8, 16], alpha=16)
    r32 = cfg.resolve(32)
    assert r32["num_layers"] == 32
    assert r32["experts"] == groups([8, 6, 4, 2], [8, 8, 8, 8])
    assert r32["top_k"] == [2] * 32
    assert r32["rank"] == groups([4, 8, 8, 16], [8, 8, 8, 8])
    assert r32["scaling"] == groups([4.0, 2.0, 2.0, 1.0], [8, 8, 8, 8])
    assert r32["targets"] == list(SEVEN)
    r28 = cfg.resolve(28)
    assert r28["experts"] == groups([8, 6, 4, 2], [7, 7, 7, 7])
    assert r28["rank"] == groups([4, 8, 8, 16], [7, 7, 7, 7])
    assert len(r28["scaling"]) == 28


def test_resolve_uneven_splits_and_full_lists():
    assert MoLAConfig(experts="2468").resolve(30)["experts"] == groups([2, 4, 6, 8], [8, 8, 7, 7])
    assert MoLAConfig(experts="2,4,6,8").resolve(5)["experts"] == [2, 2, 4, 6, 8]
    full = [1 + i % 3 for i in range(28)]
    assert MoLAConfig(experts=full, top_k=1).resolve(28)["experts"] == full
    assert mola.config.expand_preset("10-2-2-2", 32) == groups([10, 2, 2, 2], [8, 8, 8, 8])


def test_resolve_errors():
    with pytest.raises(ValueError, match="a list of 5 entries fits neither 4 groups nor the model's 32 layers"):
        MoLAConfig(experts=[2, 2, 2, 2, 2]).resolve(32)
    with pytest.raises(ValueError, match=r"top_k 2 exceeds experts 1 in layer 3 .*lower top_k"):
        MoLAConfig(experts=[2, 2, 2, 1, 2]).resolve(5)
    with pytest.raises(ValueError, match="num_layers 0 must be >= 1"):
        MoLAConfig().resolve(0)
    with pytest.raises(ValueError, match="num_layers must be an int"):
        MoLAConfig().resolve("32")


def test_preset_names():
    assert _C.preset_names() == ["rectangle", "triangle", "inverted", "hourglass", "diamond"]
