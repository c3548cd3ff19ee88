"""pytest set-up shared by the Python tests. The tests mirror the sources:
ops/, models/, nn/ (the Python layer, inject and the adapter files),
train/, data/, io/, cli/ and docs/; tiny_models.py, beside this file, is
shared by all of them."""
import hashlib
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_models, from any subfolder

import pytest
import torch


def _inductor_cache_dir() -> str:
    # Inductor's on-disk cache keys graphs by their Python-visible form, not by the
    # C++ schema of custom ops; a rebuilt libmola whose op changed could be served a
    # stale graph. One cache per build of libmola keeps the reuse and drops the risk.
    import importlib.util
    spec = importlib.util.find_spec("mola._C")
    stat = Path(spec.origin).stat() if spec and spec.origin else None
    key = hashlib.sha1(f"{stat.st_size}-{stat.st_mtime_ns}".encode() if stat else b"none")
    return os.path.join(tempfile.gettempdir(), f"mola-inductor-{key.hexdigest()[:12]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())


@pytest.fixture(scope="module")
def one_thread():
    """Runs a module's tests on one torch thread (tests that compare runs
    step by step are faster and steadier without thread contention)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
