"""The torchrun entry of test_distributed.py: several runs of
examples/python/train_distributed.py in the same two processes, so that torch,
transformers and mola are imported once rather than once per run.

    torchrun --standalone --nproc_per_node=2 tests/python/train/distributed_runs.py '[["--model", "hf"], ...]'
"""
import importlib.util
import json
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "python" / "train_distributed.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_distributed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    import torch.distributed as dist

    example = load_example()
    dist.init_process_group("gloo")  # one group for all the runs (main() uses the caller's)
    try:
        for argv in json.loads(sys.argv[1]):
            example.main(argv)
    finally:
        dist.destroy_process_group()
