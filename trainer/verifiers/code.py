"""The "code" verifier: runs the response's Python program against tests in the sandbox.

`item.metadata["tests"]` is either
- stdin/stdout cases: a list of {"input": str, "output": str} (or {"inputs": [...],
  "outputs": [...]}, or either as a JSON string); a case passes when the program exits 0
  and its stdout matches, ignoring trailing whitespace per line and blank lines at the
  ends; each case is its own sandboxed run; or
- assert-based test code (a string that is not JSON): appended to the program and run once;
  each top-level `assert` counts as one test.
Call-based cases (APPS/TACO's `fn_name`) are refused as an error, not run as stdin.
The score is the fraction of tests passed (ProRL); a run that crashes or times out as a
whole scores 0. `metadata["timeout_s"]` (default 5 s) bounds the programs' total wall
time; the sandbox's own start-up per case (`sandbox_startup_s`, about 50 ms here) is not
charged to it, so a program's score does not fall with its number of cases. The verifier
pool's per-sample timeout (`verifier.timeout_s`) still bounds the whole item.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import time

from brorl.trainer.verifiers.base import VerifyItem, register_verifier
from brorl.trainer.verifiers.sandbox import run_sandboxed, sandbox_startup_s

DEFAULT_TIMEOUT_S = 5.0
_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_BARE_FENCE = re.compile(r"```[ \t]*\n(.*?)```", re.DOTALL)


@register_verifier("code")
def verify_code(item: VerifyItem) -> float:
    """Fraction of `item.metadata["tests"]` the extracted program passes (see the module
    docstring). Raises ValueError when the item has no usable tests."""
    tests = item.metadata.get("tests")
    timeout_s = float(item.metadata.get("timeout_s", DEFAULT_TIMEOUT_S))
    program = extract_program(item.response)
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            return score_asserts(program, tests, timeout_s)
    return score_io(program, io_cases(tests), timeout_s)


def extract_program(text: str) -> str:
    """The last ```python (or ```py) fenced block, else the last unlabelled one, else the
    whole response."""
    blocks = _PYTHON_FENCE.findall(text) or _BARE_FENCE.findall(text)
    return blocks[-1] if blocks else text


def io_cases(tests) -> list[tuple[str, str]]:
    """[(stdin, expected stdout)] from a list of {"input", "output"} dicts or from
    {"inputs": [...], "outputs": [...]}. Raises ValueError for anything else or no cases."""
    if isinstance(tests, dict) and tests.get("fn_name"):
        # APPS/TACO call-based cases: inputs are a function's arguments, not stdin; run as
        # stdin a right solution would score 0 without anyone noticing
        raise ValueError(f"code tests with fn_name={tests['fn_name']!r} (call-based, APPS "
                         "style) are not supported: give stdin/stdout cases or assert code")
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        if len(tests["inputs"]) != len(tests["outputs"]):
            raise ValueError("code tests: 'inputs' and 'outputs' differ in length")
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    if not isinstance(tests, list) or not tests:
        raise ValueError("code verifier needs metadata 'tests': a non-empty list of "
                         "{'input', 'output'} cases or a string of assert-based test code")
    try:
        return [(str(t["input"]), str(t["output"])) for t in tests]
    except (KeyError, TypeError) as e:
        raise ValueError(f"code test cases need 'input' and 'output': {e}") from e


def score_io(program: str, cases: list[tuple[str, str]], timeout_s: float) -> float:
    """Fraction of stdin/stdout cases passed, one sandboxed run each, all within timeout_s
    plus each run's start-up (cases left when the time is spent count as failed)."""
    startup = sandbox_startup_s()
    deadline, passed = time.monotonic() + timeout_s, 0
    for stdin, expected in cases:
        deadline += startup
        left = deadline - time.monotonic()
        if left <= 0:
            break
        result = run_sandboxed(program, stdin, timeout_s=left)
        if result.timed_out:
            break
        passed += result.ok and same_output(result.stdout, expected)
    return passed / len(cases)


def same_output(actual: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and blank lines at either end."""
    def norm(s: str) -> list[str]:
        return [line.rstrip() for line in s.strip().splitlines()]

    return norm(actual) == norm(expected)


def score_asserts(program: str, tests: str, timeout_s: float) -> float:
    """Fraction of the top-level asserts in `tests` that hold after `program` ran, in one
    sandboxed run; 0 when the run fails as a whole (syntax error, crash outside an assert,
    timeout). Test code without top-level asserts scores 1 if it runs cleanly."""
    try:
        harness, num_asserts, marker = _assert_harness(tests)
    except SyntaxError as e:
        raise ValueError(f"code verifier: the test code does not parse: {e}") from e
    result = run_sandboxed(program + "\n\n" + harness, timeout_s=timeout_s)
    if not result.ok:
        return 0.0
    lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
    if not lines:
        return 0.0
    passed = int(lines[-1].split()[1])
    return passed / num_asserts if num_asserts else 1.0


def _assert_harness(tests: str) -> tuple[str, int, str]:
    """(code that runs `tests` counting the top-level asserts that hold, their number, the
    random marker that starts the line reporting the count)."""
    token = secrets.token_hex(8)
    marker, counter = f"__brorl_passed_{token}", f"_brorl_passed_{token}"
    out, num_asserts = [f"{counter} = 0"], 0
    for node in ast.parse(tests).body:
        source = ast.unparse(node)
        if not isinstance(node, ast.Assert):
            out.append(source)
            continue
        num_asserts += 1
        body = "\n".join("    " + line for line in source.splitlines())
        out.append(f"try:\n{body}\nexcept Exception:\n    pass\nelse:\n    {counter} += 1")
    out.append(f"print('\\n{marker}', {counter}, flush=True)")
    return "\n".join(out) + "\n", num_asserts, marker
