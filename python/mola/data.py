"""mola.data: the data pipeline of the C++ core (mola/data/*.h), under one name.

Everything here is mola._C's: Tokenizer (SentencePiece tokenizer.model), PromptTemplate (the authors' alpaca
template, or PromptTemplate.raw()), Row, DataOptions, Example, load_rows, tokenize_row(s) and task_names. Paths
may be str or os.PathLike. Missing files raise FileNotFoundError; bad contents ValueError naming the file, line
and field. The task conversions and their wordings are described in data/README.md.
"""
import torch  # noqa: F401  (libmola links libtorch: torch must be loaded first)

from ._C import (DataFileNotFoundError, DataOptions, Example, PromptTemplate, Row, Tokenizer, load_rows,
                 task_names, tokenize_row, tokenize_rows)

__all__ = ["DataFileNotFoundError", "DataOptions", "Example", "PromptTemplate", "Row", "Tokenizer", "load_rows",
           "task_names", "tokenize_row", "tokenize_rows"]

DataFileNotFoundError.__doc__ = (
    "A data, template or tokenizer file that does not exist (a FileNotFoundError); the message names the path.")
