"""The D2F authors' own loop's outputs (tests/data/conformance): both decode paths, each row alone
and each parameter set as one left-padded batch, must give the same tokens before the first EOS,
and the same forwards (no more where an EOS was decoded)."""

import pytest
import torch

from d2f_ext import D2FConfig, patch
from d2f_ext.decoding import d2f_decode, reference_decode
from d2f_ext.models import load_model

CASES = ["llada", "dream"]


@pytest.fixture(scope="module", params=CASES)
def conformance(request, conformance_checkpoint):
    folder, case = conformance_checkpoint(request.param)
    return patch(load_model(folder)), case


def _param_sets(case):
    groups = {}
    for run in case["d2f_runs"]:
        key = (tuple(sorted(run["params"].items())), run["max_new_tokens"])
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def _config(run):
    return D2FConfig(max_new_tokens=run["max_new_tokens"], **run["params"])


def _check(run, tokens, forwards):
    assert tokens == run["tokens_before_eos"]
    if run["eos"]:
        assert forwards <= run["forwards"]
    else:
        assert forwards == run["forwards"]


PATHS = {"kernel": lambda m, p, c: d2f_decode(m, p, c, static=False),
         "kernel-static": lambda m, p, c: d2f_decode(m, p, c, static=True, sync_every=3),
         "reference": reference_decode}


@pytest.mark.parametrize("path", PATHS)
def test_each_row_alone(conformance, path):
    model, case = conformance
    for run in case["d2f_runs"]:
        out = PATHS[path](model, [run["prompt"]], _config(run))
        _check(run, out.tokens_before_eos(model.config.eos_token_id)[0], int(out.forwards[0]))


def test_each_parameter_set_as_one_static_batch(conformance):
    """The fixed-shape steps (what CUDA graphs replay) over a batch of rows that finish apart."""
    model, case = conformance
    for runs in _param_sets(case):
        out = d2f_decode(model, [r["prompt"] for r in runs], _config(runs[0]), static=True, sync_every=3)
        rows = out.tokens_before_eos(model.config.eos_token_id)
        for i, run in enumerate(runs):
            _check(run, rows[i], int(out.forwards[i]))


@pytest.mark.parametrize("decoder", ["d2f", "reference"])
def test_each_parameter_set_as_one_left_padded_batch(conformance, decoder):
    model, case = conformance
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    for runs in _param_sets(case):
        width = max(len(r["prompt"]) for r in runs)
        ids = torch.tensor([[pad] * (width - len(r["prompt"])) + r["prompt"] for r in runs])
        mask = torch.tensor([[0] * (width - len(r["prompt"])) + [1] * len(r["prompt"]) for r in runs])
        # generate's max_new_tokens is transformers' exact bound; the authors' loop decodes the
        # whole blocks within its own (gen_len).
        out = model.generate(ids, attention_mask=mask, decoder=decoder, return_dict_in_generate=True,
                             max_new_tokens=_config(runs[0]).gen_len, **runs[0]["params"])
        for i, run in enumerate(runs):
            new = out.sequences[i, width:].tolist()
            n = int(out.new_tokens[i])
            assert new[n:] == ([eos] + [pad] * (len(new) - n - 1) if run["eos"] else [pad] * (len(new) - n))
            _check(run, new[:n], int(out.forwards[i]))
