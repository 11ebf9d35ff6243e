"""`python -m d2f_ext.selftest`, the check users run, on the CPU."""

import pytest
import torch

from d2f_ext import ops, selftest

pytestmark = pytest.mark.skipif(not ops.HAVE_C, reason="d2f_ext._C not built")

OPS = ("attention", "store_kv", "unmask", "pipeline_step")


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

