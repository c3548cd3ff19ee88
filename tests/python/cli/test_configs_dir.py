"""The adapter configs shipped in configs/adapters load and mean what their names say."""
import json
from pathlib import Path

import pytest

import mola

ADAPTERS = Path(__file__).resolve().parents[3] / "configs" / "adapters"
GROUPS = {"rectangle": [5, 5, 5, 5], "triangle": [8, 6, 4, 2], "inverted": [2, 4, 6, 8],
          "hourglass": [8, 2, 2, 8], "diamond": [2, 8, 8, 2]}


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_preset_config_resolves_to_its_groups(name):
    cfg = mola.MoLAConfig.from_json(ADAPTERS / f"mola-{name}.json")
    experts = cfg.resolve(32)["experts"]
    assert [experts[8 * g] for g in range(4)] == GROUPS[name]
    assert all(experts[8 * g + i] == experts[8 * g] for g in range(4) for i in range(8))
    assert sum(experts) == 160
    llama7b = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
               "o_proj": (4096, 4096), "gate_proj": (4096, 11008), "up_proj": (4096, 11008),
               "down_proj": (11008, 4096)}
    assert cfg.num_parameters(llama7b, 32) == 105_635_840  # the papers' count for 160 experts


def test_every_shipped_config_is_checked():
    assert sorted(p.stem for p in ADAPTERS.glob("*.json")) == sorted(f"mola-{n}" for n in GROUPS)
    for path in ADAPTERS.glob("*.json"):
        assert json.loads(path.read_text())["experts"] in GROUPS
