"""``python -m mola`` (and the ``mola`` console script): the same command as the
C++ program ``mola`` (train, eval, generate, convert), run by the C++ library
through the bindings, plus ``report``, which draws a run's plots in Python.
"""
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
    from . import _C
    sys.stdout.flush()
    return _C.run_command(args)


if __name__ == "__main__":
    sys.exit(main())
