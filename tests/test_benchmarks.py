"""The benchmark programs run as their README commands do and write what they promise."""

import json
import os

import pytest

from d2f_bench import conformance


def test_conformance_bench_runs_on_the_repository_cases(tmp_path):
    """From the repository's root (where the tests run) the default --cases is found; a trimmed
    copy, one run per model, gives the authors' tokens and forwards on every path."""
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("llada", "dream"):
        with open(os.path.join(conformance.CASES, f"{name}.json"), encoding="utf-8") as f:
            case = json.load(f)
        case["d2f_runs"] = case["d2f_runs"][:1]
        (cases / f"{name}.json").write_text(json.dumps(case))
    rows = conformance.main(["--cases", str(cases), "--repeat", "1", "--threads", "1", "--out", str(tmp_path / "out")])
    assert [r["path"] for r in rows] == list(conformance.PATHS) * 2
    assert all(r["same_tokens_as_authors"] and r["same_forwards_as_authors"] for r in rows)
    assert all(r["generated_tokens"] > 0 for r in rows)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"conformance.json", "conformance.md", "conformance.png"}


def test_conformance_bench_names_a_missing_cases_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        conformance.main(["--cases", str(tmp_path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--cases" in capsys.readouterr().err


def test_contention_bench_writes_every_setting(tmp_path):
    from d2f_bench import contention

    rows = contention.main(["--rows", "2", "--requests", "2", "--max-tokens", "8", "--repeat", "1",
                            "--out", str(tmp_path)])
    assert [(r["threads"], r["load"]) for r in rows] == [(1, 0.0), (1, 0.4), (2, 0.0), (2, 0.4)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert all(len(r["samples"]) == 1 for r in rows)
    assert {p.name for p in tmp_path.iterdir()} == {"contention.json", "contention.md", "contention.png"}


def test_serve_bench_reports_the_round_of_median_speedup():
    from d2f_bench.serve import median_round

    rounds = [dict(speedup=s, in_process_speedup=s + 1, identical=n, tokens_per_s=100 * s)
              for s, n in ((3.0, 8), (1.0, 8), (2.0, 7))]
    got = median_round(rounds)
    assert got["speedup"] == 2.0 and got["tokens_per_s"] == 200.0  # one round's figures, whole
    assert got["speedups"] == [3.0, 1.0, 2.0] and got["in_process_speedups"] == [4.0, 2.0, 3.0]
    assert got["identical"] == 7
    assert median_round(rounds[:2])["speedup"] == 1.0  # an even count: the lower middle


@pytest.fixture(scope="module")
def shipped():
    from d2f_ext import AutoD2FModel
    from d2f_ext.cli import DEFAULT_MODEL

    return AutoD2FModel.from_pretrained(DEFAULT_MODEL)


def test_serve_bench_clients_read_what_generate_gives(shipped):
    """The benchmark's clients parse d2f-serve's event stream into the texts and token counts
    that ``model.generate`` gives on each request alone."""
    import asyncio

    from d2f_bench.serve import NAME, alone, questions, serve_level
    from d2f_ext.serve.server import BackgroundServer, build_app

    prompts = questions(5, seed=3)
    want = alone(shipped, prompts, 24)
    with BackgroundServer(build_app(shipped, name=NAME, max_batch=2)) as s:
        got = asyncio.run(serve_level(s.url, prompts, 3, 24))
    assert got["texts"] == want["texts"] and got["tokens"] == want["tokens"] > 0
    assert len(got["ttft"]) == len(prompts) and all(0 < t <= lat for t, lat in zip(got["ttft"], got["latency"]))


def test_serve_bench_clients_stop_on_a_server_error(shipped):
    import asyncio

    from d2f_bench.serve import NAME, questions, serve_level
    from d2f_ext.serve.server import BackgroundServer, build_app

    app = build_app(shipped, name=NAME, max_batch=2)

    def broken():
        raise RuntimeError("out of cheese")

    app.state.engine_loop.engine.step = broken
    with BackgroundServer(app) as s:
        with pytest.raises(RuntimeError, match="out of cheese"):
            asyncio.run(serve_level(s.url, questions(1), 1, 8))


def test_linear_bench_writes_every_setting(tmp_path):
    from d2f_bench import linear

    rows = linear.main(["--rows", "1", "3", "--threads", "1", "2", "--shape", "100", "8", "--shape", "5", "300",
                        "--repeat", "1", "--out", str(tmp_path)])
    assert [(r["threads"], r["out_features"], r["rows"]) for r in rows] == [
        (t, n, r) for t in (1, 2) for n in (100, 5) for r in (1, 3)]
    assert all(r["kernel_ms"] > 0 and r["linear_ms"] > 0 and r["max_abs_diff"] < 1e-4 for r in rows)
    assert {p.name for p in tmp_path.iterdir()} == {"linear.json", "linear.md", "linear.png"}
