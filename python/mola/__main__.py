"""``python -m mola`` (and the ``mola`` console script): the same command as the
C++ program ``mola`` (train, eval, generate, convert llama2c), run by the C++
library through the bindings, plus two that are Python's: ``report``, which
draws a run's plots, and ``convert mola-authors``, which reads the authors'
pickled adapter_model.bin with torch.load(weights_only=True).

Under ``torchrun`` (WORLD_SIZE > 1), ``train`` joins torch.distributed: this
module initialises the default process group (Gloo on the CPU, NCCL for CUDA
tensors) and hands it to the C++ trainer, which trains as one of its ranks
(design.md 11): ``torchrun --nproc_per_node=2 -m mola train RECIPE``.
"""
import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "report":
        if len(args) != 2:
            print("usage: python -m mola report OUT_DIR", file=sys.stderr)
            return 2
        from .report import write_report
        try:
            page = write_report(args[1])
        except (FileNotFoundError, ValueError) as e:
            print(f"mola: error: {e}", file=sys.stderr)
            return 2
        print(f"report: {page}")
        return 0
    if args[:2] == ["convert", "mola-authors"]:
        return _convert_authors(args[2:])
    from . import _C
    if _launcher_world_size() > 1:
        if not args or args[0] != "train":
            print(f"mola: error: {args[0] if args else 'mola'} runs in one process; only `mola train` runs under "
                  "torchrun (WORLD_SIZE is " + os.environ["WORLD_SIZE"] + ")", file=sys.stderr)
            return 2
        return _train_distributed(args)
    sys.stdout.flush()
    return _C.run_command(args)


def _launcher_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _train_distributed(args: List[str]) -> int:
    """``mola train`` as one rank of the group torchrun describes (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK in the environment)."""
    import torch
    import torch.distributed as dist

    from . import _C
    if torch.cuda.is_available():
        # One GPU per rank: a recipe's device "cuda" is the current device.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend)
    try:
        sys.stdout.flush()
        return _C.run_command(args, dist.group.WORLD)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _convert_authors(args: List[str]) -> int:
    """``convert mola-authors IN OUT [--top-k K]``: in Python, because the
    authors' adapter_model.bin needs torch.load(weights_only=True)."""
    import argparse

    from .authors import import_authors_adapter

    parser = argparse.ArgumentParser(prog="mola convert mola-authors",
                                     description="an adapter written by the MoLA authors' code, into mola's format")
    parser.add_argument("src", help="the authors' adapter directory (adapter_config.json, adapter_model.bin)")
    parser.add_argument("out", help="the mola adapter directory to write")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (not stored by the authors; 2)")
    a = parser.parse_args(args)
    try:
        resolved = import_authors_adapter(a.src, a.out, top_k=a.top_k)
    except (FileNotFoundError, ValueError) as e:
        print(f"mola: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: experts per layer {resolved['experts']}, top_k {resolved['top_k']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
