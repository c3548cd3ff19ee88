"""Pure-PyTorch oracles that the tests and benchmarks compare mola against.

Nothing here imports mola: these files are written from the method
descriptions (docs/design.md, Fidelity to the papers and the authors' code) so that a bug in the C++ op cannot hide
in its own oracle.
"""
