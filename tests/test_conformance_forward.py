"""The raw logits of the conformance models, loaded through load_model, against the figures the
authors' model classes produced (bidirectional and D2F block-causal attention)."""

import pytest
import torch

from d2f_ext.models import load_model


def conformance_block_ids(length: int, prompt_len: int, block_size: int) -> torch.Tensor:
    tail = [1 + (i - prompt_len) // block_size for i in range(prompt_len, length)]
    return torch.tensor([[0] * prompt_len + tail], dtype=torch.int32)


@pytest.fixture(scope="module", params=["llada", "dream"])
def loaded(request, conformance_checkpoint):
    folder, case = conformance_checkpoint(request.param)
    return load_model(folder), case


@pytest.mark.parametrize("mode", ["bidirectional", "block_causal"])
def test_forward_matches_conformance(loaded, mode):
    model, case = loaded
    fwd = case["forward"]
    ids = torch.tensor([fwd["input_ids"]])
    block_ids = None
    if mode == "block_causal":
        block_ids = conformance_block_ids(ids.shape[1], fwd["prompt_len"], fwd["block_size"])
    with torch.no_grad():
        logits = model(ids, block_ids=block_ids)[0].double()
    want = fwd[mode]
    assert logits.shape == (ids.shape[1], model.config.vocab_size)
    assert logits.argmax(-1).tolist() == want["argmax"]
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(logits.max(-1).values, f64(want["max"]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits.logsumexp(-1), f64(want["logsumexp"]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[:, want["probe_ids"]], f64(want["at_probe_ids"]), rtol=1e-4, atol=1e-4)


def test_block_causal_differs_from_bidirectional(loaded):
    # Guards the test above against a mask that is silently ignored.
    model, case = loaded
    fwd = case["forward"]
    ids = torch.tensor([fwd["input_ids"]])
    block_ids = conformance_block_ids(ids.shape[1], fwd["prompt_len"], fwd["block_size"])
    with torch.no_grad():
        a = model(ids)[0, : fwd["prompt_len"]]
        b = model(ids, block_ids=block_ids)[0, : fwd["prompt_len"]]
    assert (a - b).abs().max() > 1e-2


def test_config_fields(loaded):
    model, case = loaded
    c = model.config
    assert c.head_dim == 64
    assert c.mask_token_id == case["config"]["mask_token_id"]
    assert c.eos_token_id == case["config"]["eos_token_id"]
    assert c.logit_shift == (c.arch == "dream")
    assert c.num_kv_heads == (1 if c.arch == "dream" else 2)
    assert set(model.state_dict()) == {t[0] for t in case["weights"]["tensors"]}
