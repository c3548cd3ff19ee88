"""``python -m mola`` (and the ``mola`` console script): the same command as the
C++ program ``mola`` (train, eval, generate, convert llama2c), run by the C++
library through the bindings, plus three that are Python's: ``report``, which
draws a run's plots, ``analyze``, the redundancy and routing of an adapter
(mola.analysis), and ``convert mola-authors``, which reads the authors'
pickled adapter_model.bin with torch.load(weights_only=True).

Under ``torchrun`` (WORLD_SIZE > 1), ``train`` joins torch.distributed: this
module initialises the default process group (Gloo on the CPU, NCCL for CUDA
tensors) and hands it to the C++ trainer, which trains as one of its ranks
(docs/distributed.md): ``torchrun --nproc_per_node=2 -m mola train RECIPE``.
"""
import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional


class _Parser(argparse.ArgumentParser):
    """argparse with the command's conventions: the help text is the verb
    table's (``--help`` is answered before parsing), and a bad argument is one
    line on stderr and exit status 2, naming the verb's --help."""

    def error(self, message):
        print(f"mola: error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


def _run_cpp(args: List[str], _: Optional[argparse.Namespace]) -> int:
    """A verb of the C++ command: the library parses its arguments."""
    from . import _C
    if _launcher_world_size() > 1:
        if not args or args[0] != "train":
            print(f"mola: error: {args[0] if args else 'mola'} runs in one process; only `mola train` runs under "
                  "torchrun (WORLD_SIZE is " + os.environ["WORLD_SIZE"] + ")", file=sys.stderr)
            return 2
        return _train_distributed(args)
    sys.stdout.flush()
    return _C.run_command(args)


def _add_report(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("out_dir")
    return _report


def _add_convert_authors(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--top-k", default="2")
    return _convert_authors


def _add_analyze(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("adapter")
    p.add_argument("--data")
    p.add_argument("--model")
    p.add_argument("--recipe")
    p.add_argument("--out")
    p.add_argument("--max-examples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    return _analyze


# The Python package's verbs: each declares its arguments on its subparser and
# returns its handler. Every python_only verb of the table has one (a test checks).
PYTHON_VERBS: Dict[str, Callable[[argparse.ArgumentParser], Callable]] = {
    "report": _add_report,
    "convert mola-authors": _add_convert_authors,
    "analyze": _add_analyze,
}


def build_parser(verbs: Optional[List[Dict[str, Any]]] = None) -> argparse.ArgumentParser:
    """``python -m mola`` as argparse subcommands over the command's one table
    of verbs (``mola._C.command_verbs()``, the table the C++ program prints):
    a subparser per verb, named as the table names it ("convert mola-authors"
    is one), whose default ``run`` is its handler. The C++ verbs take their
    arguments as written (the library parses them); the Python verbs declare
    theirs in PYTHON_VERBS."""
    if verbs is None:
        from . import _C
        verbs = _C.command_verbs()
    parser = _Parser(prog="python -m mola", add_help=False, usage=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="verb", parser_class=_Parser)
    for v in verbs:
        prog = ("python -m mola " if v["python_only"] else "mola ") + v["name"]
        p = sub.add_parser(v["name"], prog=prog, add_help=False, usage=argparse.SUPPRESS, help=v["summary"])
        if v["python_only"]:
            if v["name"] not in PYTHON_VERBS:
                raise RuntimeError(f"python -m mola: the verb table's {v['name']!r} has no Python handler")
            p.set_defaults(run=PYTHON_VERBS[v["name"]](p))
        else:
            p.set_defaults(run=_run_cpp)
    parser.set_defaults(verb_parsers=sub.choices)  # {verb: its subparser}
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from . import _C
    args = list(sys.argv[1:] if argv is None else argv)
    verb = _C.command_verb_of(args)
    if verb is None:  # no verb, --help, --version, a typo: the command's usage and did-you-mean
        return _run_cpp(args, None)
    if "-h" in args or "--help" in args:
        print(_C.command_help(verb), end="")  # the command's one table of verbs
        return 0
    parser = build_parser()
    run = parser.get_default("verb_parsers")[verb].get_default("run")
    if run is _run_cpp:
        return _run_cpp(args, None)
    rest = args[len(verb.split()):]
    try:
        return run(parser.parse_args([verb] + rest))
    except (FileNotFoundError, ValueError) as e:  # a user's error in a Python verb: one line, exit 2
        print(f"mola: error: {e}", file=sys.stderr)
        return 2


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


def _report(a: argparse.Namespace) -> int:
    """``report OUT_DIR``: the plots and page of a run."""
    from .report import write_report
    print(f"report: {write_report(a.out_dir)}")
    return 0


def _convert_authors(a: argparse.Namespace) -> int:
    """``convert mola-authors IN OUT [--top-k K]``: in Python, because the
    authors' adapter_model.bin needs torch.load(weights_only=True)."""
    from .authors import import_authors_adapter
    resolved = import_authors_adapter(a.src, a.out, top_k=_top_k(a.top_k))
    print(f"wrote {a.out}: experts per layer {resolved['experts']}, top_k {resolved['top_k']}")
    return 0


def _analyze(a: argparse.Namespace) -> int:
    """``analyze ADAPTER [--data FILE] [--model DIR] [--recipe R] [--out DIR] [--max-examples N]``."""
    if a.max_examples < 0 or a.batch_size < 1:
        print(f"mola: error: --max-examples ({a.max_examples}) must be >= 0 and --batch-size ({a.batch_size}) "
              ">= 1", file=sys.stderr)
        return 2
    from .analysis import analyze
    analyze(a.adapter, data=a.data, model=a.model, out=a.out, max_examples=a.max_examples,
            batch_size=a.batch_size, recipe=a.recipe, device=a.device)
    return 0


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
