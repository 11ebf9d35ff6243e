"""The user-facing checks run on the CPU: `python -m d2f_ext.selftest` and
d2f_bench.sanitize_ops (which python/gpu_check.sh runs under compute-sanitizer)."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from d2f_ext import ops, selftest

pytestmark = pytest.mark.skipif(not ops.HAVE_C, reason="d2f_ext._C not built")

OPS = ("attention", "store_kv", "unmask", "pipeline_step", "linear", "rms_norm", "rope")  # the last three: CPU only


def test_selftest_passes_on_cpu(capsys):
    assert selftest.main(["--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    verdicts = [line for line in lines if line.startswith(("PASS", "FAIL"))]
    assert [v.split()[1] for v in verdicts] == list(OPS)
    assert all(v.startswith("PASS") for v in verdicts)


def test_selftest_reports_a_wrong_op(monkeypatch, capsys):
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: real(*a, **k) + 0.01)
    monkeypatch.setattr(selftest, "check_unmask", lambda device: None)  # keep the run short
    assert selftest.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL attention" in out and "PASS store_kv" in out


def test_selftest_rejects_a_bad_device():
    with pytest.raises(SystemExit):
        selftest.main(["--device", "tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            selftest.main(["--device", "cuda"])


def test_sanitize_ops_runs_on_cpu():
    import d2f_bench

    where = [pathlib.Path(m.__file__).resolve().parents[1] for m in (ops, d2f_bench)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, where)))
    done = subprocess.run([sys.executable, "-m", "d2f_bench.sanitize_ops", "--device", "cpu"],
                          cwd=where[0], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("sanitize_ops: ok")
