"""HumanEval's pass@k, as lm-eval's own humaneval task computes it (the programs arrive whole
from d2f_code_sanitize, so its prompt-prefixing filter is not used)."""

from lm_eval.tasks.humaneval.utils import pass_at_k

__all__ = ["pass_at_k"]
