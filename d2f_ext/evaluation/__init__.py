"""Evaluation of D2F decoding through lm-evaluation-harness (``pip install d2f_ext[eval]``).

Importing this package registers the lm-eval model ``d2f`` and the filter
``d2f_code_sanitize``; ``TASKS_DIR`` holds the package's own tasks (``d2f_math``, the offline
math task, and ``humaneval_d2f``), which ``d2f-eval`` adds to lm-eval's task search path.
"""

import os

# lm-eval fills its model registry with the built-in models on the first lookup, but only while
# the registry is empty: registering d2f first would hide hf, vllm and the rest.
import lm_eval.models  # noqa: F401

from . import filters, model  # noqa: F401  (registration happens at import)
from .presets import PRESETS

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")

__all__ = ["PRESETS", "TASKS_DIR"]
