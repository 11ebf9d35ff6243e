"""lm-eval filters of the package: ``d2f_code_sanitize``, HumanEval's code clean-up.

Diffusion models decode a whole canvas and often write more than the function: a markdown
fence, a test call, a second attempt. The D2F and LLaDA evaluations therefore generate without
HumanEval's stop strings and keep only the program that defines the entry point; so does this
filter, whose output is the whole program (prompt included) that HumanEval's tests run against.
"""

from __future__ import annotations

import ast
import re

from lm_eval.api.filter import Filter
from lm_eval.api.registry import register_filter

FENCE_RE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.S)
# Top-level statements a solution may need; calls, prints, asserts and __main__ blocks go.
KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
        ast.AnnAssign)


def _parsable_prefix(code: str) -> str:
    """The longest run of whole lines from the start of ``code`` that parses."""
    lines = code.split("\n")
    for end in range(len(lines), 0, -1):
        candidate = "\n".join(lines[:end])
        try:
            ast.parse(candidate)
            return candidate
        except SyntaxError:
            continue
    return ""


def sanitize(prompt: str, completion: str, entry_point: str) -> str:
    """The program HumanEval should test: the first fenced code block of ``completion`` if it has
    one, after ``prompt`` unless it starts at column 0 and defines ``entry_point`` itself (then
    the prompt's imports only), cut to its longest parsable prefix, with only imports,
    definitions and assignments kept at top level."""
    fence = FENCE_RE.search(completion)
    code = fence.group(1) if fence else completion
    first = next((line for line in code.split("\n") if line.strip()), "")
    # An indented start continues the prompt's function, even when a second attempt at the entry
    # point follows it.
    if not first[:1].isspace() and re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        imports = [line for line in prompt.split("\n") if line.startswith(("import ", "from "))]
        program = "\n".join(imports + [code])
    else:
        program = prompt + code
    program = _parsable_prefix(program)
    if not program:
        return prompt + code  # nothing parses: let the tests fail on the text as written
    tree = ast.parse(program)
    dropped = set()
    for node in tree.body:
        if not isinstance(node, KEEP):
            dropped.update(range(node.lineno, node.end_lineno + 1))
    kept = [line for i, line in enumerate(program.split("\n"), 1) if i not in dropped]
    return "\n".join(kept).rstrip() + "\n"


@register_filter("d2f_code_sanitize")
class CodeSanitizeFilter(Filter):
    """Per response: sanitize(doc["prompt"], response, doc["entry_point"])."""

    def apply(self, resps, docs):
        return [[sanitize(doc["prompt"], r, doc["entry_point"]) for r in resp] for resp, doc in zip(resps, docs)]
