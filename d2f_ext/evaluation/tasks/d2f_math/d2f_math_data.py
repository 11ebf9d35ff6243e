"""The d2f_math task's problems, read from the JSONL file beside this module (lm-eval resolves
a YAML's data_files against the working directory, not the YAML's folder)."""

import os

import datasets

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "d2f_math_test.jsonl")


def load(**_):
    # lm-eval passes the run's model_args and metadata as keyword arguments; the data needs none.
    return datasets.load_dataset("json", data_files={"test": DATA})
