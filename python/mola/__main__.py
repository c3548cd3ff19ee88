"""``python -m mola`` (and the ``mola`` console script): the same command as the
C++ program ``mola`` (train, eval, generate, convert llama2c), run by the C++
library through the bindings, plus three that are Python's: ``report``, which
draws a run's plots, ``analyze``, the redundancy and routing of an adapter
(mola.analysis), and ``convert mola-authors``, which reads the authors'
pickled adapter_model.bin with torch.load(weights_only=True).

Under ``torchrun`` (WORLD_SIZE > 1), ``train`` joins torch.distributed: this
module initialises the default process group (Gloo on the CPU, NCCL for CUDA
tensors) and hands it to the C++ trainer, which trains as one of its ranks
(design.md 11): ``torchrun --nproc_per_node=2 -m mola train RECIPE``.
"""
import os
import sys
from typing import List, Optional


def _python_verb(args: List[str]) -> Optional[str]:
    """The verb of ``args`` when it is one of the Python package's, else None."""
    if args[:2] == ["convert", "mola-authors"]:
        return "convert mola-authors"
    if args and args[0] in ("report", "analyze"):
        return args[0]
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    verb = _python_verb(args)
    if verb is not None and ("-h" in args or "--help" in args):
        from . import _C
        print(_C.command_help(verb), end="")  # the command's one table of verbs
        return 0
    if args and args[0] == "report":
        if len(args) != 2:
            print("mola: error: usage: python -m mola report OUT_DIR (python -m mola report --help)",
                  file=sys.stderr)
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
    if args and args[0] == "analyze":
        return _analyze(args[1:])
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

    from .authors import import_authors_adapter

    parser = _Parser(prog="python -m mola convert mola-authors", add_help=False)
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--top-k", default="2")
    a = parser.parse_args(args)
    try:
        top_k = _top_k(a.top_k)
        resolved = import_authors_adapter(a.src, a.out, top_k=top_k)
    except (FileNotFoundError, ValueError) as e:
        print(f"mola: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: experts per layer {resolved['experts']}, top_k {resolved['top_k']}")
    return 0


def _analyze(args: List[str]) -> int:
    """``analyze ADAPTER [--data FILE] [--model DIR] [--recipe R] [--out DIR] [--max-examples N]``."""

    parser = _Parser(prog="python -m mola analyze", add_help=False)
    parser.add_argument("adapter")
    parser.add_argument("--data")
    parser.add_argument("--model")
    parser.add_argument("--recipe")
    parser.add_argument("--out")
    parser.add_argument("--max-examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args(args)
    if a.max_examples < 0 or a.batch_size < 1:
        print(f"mola: error: --max-examples ({a.max_examples}) must be >= 0 and --batch-size ({a.batch_size}) "
              ">= 1", file=sys.stderr)
        return 2
    from .analysis import analyze
    try:
        analyze(a.adapter, data=a.data, model=a.model, out=a.out, max_examples=a.max_examples,
                batch_size=a.batch_size, recipe=a.recipe, device=a.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"mola: error: {e}", file=sys.stderr)
        return 2
    return 0


class _Parser:
    """argparse for the Python verbs, with the command's conventions: the help text
    is the verb table's (``--help`` is answered before parsing), and a bad argument
    is one line on stderr and exit status 2, naming the verb's --help."""

    def __init__(self, prog: str, add_help: bool = False):
        import argparse

        class Quiet(argparse.ArgumentParser):
            def error(self, message):
                print(f"mola: error: {message}; see {prog} --help", file=sys.stderr)
                raise SystemExit(2)

        self.parser = Quiet(prog=prog, add_help=add_help, usage=argparse.SUPPRESS)

    def add_argument(self, *args, **kwargs):
        return self.parser.add_argument(*args, **kwargs)

    def parse_args(self, args):
        return self.parser.parse_args(args)


def _top_k(text: str):
    """``--top-k``: one K for every layer ("2") or one per layer ("2,2,1,1")."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--top-k {text!r}: give a whole number (2) or one per layer, comma-separated "
                         "(2,2,1,1)") from None
    return values[0] if len(values) == 1 else values


if __name__ == "__main__":
    sys.exit(main())
