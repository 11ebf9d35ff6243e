"""The recipe evaluation's smoke path (tiny models trained on the spot, 3 problems) produces a
well-formed table, and its output check rejects malformed results."""

import copy
import json
import math

import pytest

from d2f_recipe import evaluate, task_math


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    payload = evaluate.main(["--smoke", "--out", str(out)])
    return out, payload


def test_smoke_writes_all_methods_with_consistent_numbers(smoke):
    out, _ = smoke
    with open(out / "e2e.json") as f:
        saved = json.load(f)
    rows = saved["methods"]
    assert list(rows) == list(evaluate.METHODS)
    problems = task_math.problems("test", 3, 0, saved["args"]["level"])
    for s in rows.values():
        recs = s["records"]
        assert s["problems"] == len(recs) == 3
        assert [r["answer"] for r in recs] == [p.answer for p in problems]
        assert 0.0 <= s["accuracy"] <= 1.0
        # Each summary number is what its records add up to.
        assert s["accuracy"] == pytest.approx(sum(task_math.answer_of(r["text"]) == r["answer"] for r in recs) / 3)
        assert s["generated_tokens"] == sum(len(r["ids"]) for r in recs) == sum(r["tokens"] for r in recs)
        assert s["forwards"] == sum(r["forwards"] for r in recs) and all(r["forwards"] >= 1 for r in recs)
        assert s["forwards_per_sequence"] == pytest.approx(s["forwards"] / 3)
        assert s["tokens_per_forward"] == pytest.approx(s["generated_tokens"] / s["forwards"])
        assert s["tokens_per_s"] == pytest.approx(s["generated_tokens"] / s["seconds"])
        assert all(math.isfinite(s[k]) for k in ("tokens_per_s", "seconds", "tokens_per_forward"))
        assert all(len(r["ids"]) <= saved["args"]["max_new_tokens"] for r in recs)
    assert saved["kernel_equals_reference"] is True
    assert [r["ids"] for r in rows["d2f"]["records"]] == [r["ids"] for r in rows["d2f-reference"]["records"]]
    # Vanilla decoding takes exactly its steps; the AR baseline one forward per new token.
    assert all(r["forwards"] == saved["args"]["max_new_tokens"] for r in rows["teacher-vanilla"]["records"])
    assert all(r["forwards"] in (r["tokens"], r["tokens"] + 1) for r in rows["ar"]["records"])
    for other in ("teacher-vanilla", "ar"):  # the paired split accounts for the accuracy gap
        pr = saved["paired"][f"d2f_vs_{other}"]
        assert pr["only_first"] - pr["only_second"] == round(3 * (rows["d2f"]["accuracy"] - rows[other]["accuracy"]))
        assert 0.0 < pr["p_value"] <= 1.0
    md = (out / "e2e.md").read_text().splitlines()
    assert len(md) == 2 + len(evaluate.METHODS) and md[0].startswith("| method |")
    assert (out / "e2e.png").stat().st_size > 0


def test_smoke_sweep_covers_the_grid(smoke):
    out, _ = smoke
    with open(out / "sweep.json") as f:
        sweep = json.load(f)["rows"]
    grid = {(s["skip_threshold"], s["block_add_threshold"]) for s in sweep}
    assert grid == {(a, b) for a in evaluate.SWEEP_SKIP[:2] for b in evaluate.SWEEP_ADD[:2]}
    assert all(0 <= s["accuracy"] <= 1 and s["forwards_per_sequence"] >= 1 for s in sweep)
    assert (out / "sweep.png").stat().st_size > 0
    assert len((out / "sweep.md").read_text().splitlines()) == 2 + len(sweep)


@pytest.mark.parametrize("breaks, message", [
    (lambda p: p["methods"].pop("teacher-fast-dllm"), "missing"),
    (lambda p: p["methods"]["ar"].update(tokens_per_s=float("nan")), "finite"),
    (lambda p: p["methods"]["d2f"].update(accuracy=1.5), r"outside \[0, 1\]"),
    (lambda p: p["methods"]["d2f-reference"]["records"][0].update(forwards=0), "no forward"),
    (lambda p: p["methods"]["teacher-vanilla"]["records"].pop(), "records"),
    (lambda p: p.update(kernel_equals_reference=False), "different tokens"),
])
def test_check_rejects_malformed_results(smoke, breaks, message):
    _, payload = smoke
    evaluate.check(payload)
    bad = copy.deepcopy(payload)
    breaks(bad)
    with pytest.raises(ValueError, match=message):
        evaluate.check(bad)


def test_accuracy_points_exact_at_the_target():
    row = dict(tokens_per_s=1.0)
    # Raw differences of 100 * (0.82 - 0.85) and of 100 * (0.85 - 0.90) fall just below -3 and -5.
    r = evaluate.ratios({"d2f": {**row, "accuracy": 0.82}, "teacher-vanilla": {**row, "accuracy": 0.85},
                          "ar": {**row, "accuracy": 0.90}})
    assert r["d2f_minus_vanilla_points"] == -3.0 and r["d2f_minus_ar_points"] == -8.0
    assert r["vanilla_minus_ar_points"] == -5.0


def _records(right: str) -> list[dict]:
    return [dict(answer=i, predicted=i if c == "1" else -1) for i, c in enumerate(right)]


def test_paired_counts_the_split_and_its_exact_p_value():
    r = evaluate.paired({"records": _records("11001")}, {"records": _records("10100")})
    assert (r["only_first"], r["only_second"]) == (2, 1) and r["p_value"] == 1.0
    # 9 against 1: 2 * (1 + 10) / 2**10.
    r = evaluate.paired({"records": _records("1" * 9 + "0" + "1" * 5)}, {"records": _records("0" * 9 + "1" + "1" * 5)})
    assert (r["only_first"], r["only_second"]) == (9, 1) and r["p_value"] == pytest.approx(22 / 1024)
    assert evaluate.paired({"records": _records("101")}, {"records": _records("101")})["p_value"] == 1.0


def test_paired_refuses_records_of_other_problems():
    with pytest.raises(ValueError, match="same problems"):
        evaluate.paired({"records": _records("11")}, {"records": _records("111")})
    other = [dict(answer=7, predicted=7), dict(answer=1, predicted=1)]
    with pytest.raises(ValueError, match="same problems"):
        evaluate.paired({"records": _records("11")}, {"records": other})
