"""The examples run as written and do what they say (the README promises both)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_train_synthetic_lowers_the_loss_and_uses_the_preset():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples/python/train_synthetic.py"), "--steps", "100"],
        check=True, capture_output=True, text=True, timeout=300).stdout
    assert "experts per layer [8, 6, 4, 2]" in out  # triangle over 4 layers
    start, final = map(float, re.search(r"eval mse ([\d.]+) -> ([\d.]+)", out).groups())
    assert final < 0.7 * start, out
    usage = re.findall(r"layer (\d) \((\d) experts\): ([\d. ]+)", out)
    assert [int(n) for _, n, _ in usage] == [8, 6, 4, 2]
    for _, _, shares in usage:
        assert abs(sum(map(float, shares.split())) - 1.0) < 0.02


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"One layer on its own, and the op under it:\n\n```python\n(.*?)```", text, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", "import torch\nimport mola\n" + block], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert out.strip() == "[8, 8, 8, 8, 8, 8, 8, 8, 6]"
