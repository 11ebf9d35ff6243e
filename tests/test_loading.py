"""load_model and load_adapter: file layouts, dtypes, tokenizers, LoRA merging, bad inputs."""

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2f_bench.tiny import write_tiny_checkpoint
from d2f_ext import AutoD2FModel
from d2f_ext.auto import load_tokenizer
from d2f_ext.models import CheckpointError, ModelConfig, load_adapter, load_model


def ids_for(model, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, length), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_sharded_and_single_file_load_the_same(arch, tmp_path, tiny_checkpoint):
    sharded = tiny_checkpoint(arch, seed=3)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    single = write_tiny_checkpoint(str(tmp_path), arch=arch, seed=3, shards=1, tokenizer=False)
    assert os.path.isfile(os.path.join(single, "model.safetensors"))
    a, b = load_model(sharded), load_model(single)
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not a.training
    ids = ids_for(a)
    assert torch.equal(logits(a, ids), logits(b, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype(dtype, tiny_checkpoint):
    folder = tiny_checkpoint("dream")
    model = load_model(folder, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    ref = logits(load_model(folder), ids_for(model))
    out = logits(model, ids_for(model))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_dtype_by_name_and_bad_dtype_or_device_named(tiny_checkpoint):
    folder = tiny_checkpoint("llada")
    assert {p.dtype for p in load_model(folder, dtype="bfloat16").parameters()} == {torch.bfloat16}
    for bad in ("bf16", torch.int8):
        with pytest.raises(ValueError, match="^dtype must be one of"):
            load_model(folder, dtype=bad)
    for bad in ("gpu", "cuda:7" if torch.cuda.is_available() else "cuda"):
        with pytest.raises(ValueError, match="^device "):
            AutoD2FModel.from_pretrained(folder, device=bad)


@pytest.mark.parametrize("arch", ["dream", "llada"])
def test_tokenizer_shipped_as_code_is_never_run(arch, tmp_path):
    """Dream ships DreamTokenizer as code beside vocab.json and merges.txt: it loads as Qwen2's
    tokenizer without running that code (transformers would ask to); another architecture with
    a code-only tokenizer is a clear error."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the cat sat on the mat", "one two three"] * 10, vocab_size=280,
                            special_tokens=["<|endoftext|>", "<|mask|>"])
    bpe.save_model(str(tmp_path))
    (tmp_path / "tokenization_dream.py").write_text("raise RuntimeError('checkpoint code ran')\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DreamTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "eos_token": "<|endoftext|>", "mask_token": "<|mask|>"}))
    if arch == "llada":
        with pytest.raises(ValueError, match="does not run"):
            load_tokenizer(tmp_path, arch)
        return
    tok = load_tokenizer(tmp_path, arch)
    assert tok.decode(tok("the cat sat")["input_ids"]) == "the cat sat"
    assert tok.mask_token == "<|mask|>" and tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


def test_load_to_device(device, tiny_checkpoint):
    model = load_model(tiny_checkpoint("llada"), device=device)
    assert {p.device.type for p in model.parameters()} == {device.type}
    assert logits(model, ids_for(model).to(device)).device.type == device.type


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_tokenizer_loads_with_config_ids(arch, tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    folder = tiny_checkpoint(arch)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    cfg = ModelConfig.from_file(folder)
    assert tok.convert_tokens_to_ids("<|mask|>") == cfg.mask_token_id
    assert tok.eos_token_id == cfg.eos_token_id == cfg.pad_token_id
    assert tok.mask_token == "<|mask|>"
    enc = tok("the cat is big .")["input_ids"]
    assert tok.decode(enc) == "the cat is big ."
    assert max(enc) < cfg.vocab_size
    chat = tok.apply_chat_template([{"role": "user", "content": "what is two plus two ?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|user|>") and chat.endswith("<|assistant|>")


def test_folder_without_tokenizer_loads(tmp_path):
    folder = write_tiny_checkpoint(str(tmp_path), arch="dream", tokenizer=False)
    assert sorted(os.listdir(folder)) == ["config.json", "model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    model = load_model(folder)
    assert model.config.mask_token_id == 127 and model.config.eos_token_id == 126


@pytest.mark.parametrize("tie", [False, True])
def test_tied_embeddings(tie, tmp_path):
    folder = write_tiny_checkpoint(str(tmp_path), arch="llada", tie=tie, tokenizer=False)
    model = load_model(folder)
    assert ("model.transformer.ff_out.weight" in model.state_dict()) == (not tie)


# --- LoRA adapters --------------------------------------------------------------------------

TARGETS = {"llada": ["q_proj", "k_proj", "v_proj", "attn_out"],
           "dream": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def make_adapter(model, folder, arch, **lora):
    peft = pytest.importorskip("peft")
    options = dict(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False)
    options.update(lora)
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**options))
    with torch.no_grad():  # an update well above fp32 rounding, so that a wrong merge shows
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("lora", [{}, {"use_rslora": True, "r": 8, "lora_alpha": 4},
                                  {"target_modules": ["up_proj"], "r": 2}])
def test_adapter_merge_equals_unmerged_peft(arch, lora, tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint(arch)
    base = load_model(folder)
    peft_model = make_adapter(base, str(tmp_path), arch, **lora)
    ids = ids_for(base)
    with torch.no_grad():
        want = peft_model(ids)
    merged = load_adapter(load_model(folder), str(tmp_path))
    got = logits(merged, ids)
    assert (got - logits(base, ids)).abs().max() > 1e-2  # the adapter does something
    # merged (W + s·BA) x and unmerged Wx + s·B(Ax) round differently in fp32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5 * want.abs().max().item())


def test_adapter_for_another_base(tiny_checkpoint, tmp_path):
    llada = load_model(tiny_checkpoint("llada"))
    make_adapter(load_model(tiny_checkpoint("dream")), str(tmp_path / "dream"), "dream")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.[kqvo]_proj.*model type differs.*another base"):
        load_adapter(llada, str(tmp_path / "dream"))
    wide = load_model(write_tiny_checkpoint(str(tmp_path / "wide"), arch="llada", hidden_size=256,
                                            num_heads=4, tokenizer=False))
    make_adapter(wide, str(tmp_path / "wide_adapter"), "llada")
    before = {k: v.clone() for k, v in llada.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn_out.*hidden size 256 in the adapter vs 128 in the model.*another base"):
        load_adapter(llada, str(tmp_path / "wide_adapter"))
    for k, v in llada.state_dict().items():  # a refused adapter changes nothing
        assert torch.equal(v, before[k]), k


def test_adapter_bad_files(tiny_checkpoint, tmp_path):
    model = load_model(tiny_checkpoint("llada"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, str(tmp_path))
    make_adapter(model, str(tmp_path), "llada")
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(model, str(tmp_path))


def test_adapter_config_errors_are_named(tiny_checkpoint, tmp_path):
    model = load_model(tiny_checkpoint("llada"))
    make_adapter(model, str(tmp_path), "llada")
    path = tmp_path / "adapter_config.json"
    good = path.read_text()
    cfg = json.loads(good)
    for text, match in ((good[:-5], "not valid JSON"), (json.dumps({k: v for k, v in cfg.items() if k != "r"}), "positive r"),
                        (json.dumps({**cfg, "lora_alpha": "16"}), "positive lora_alpha")):
        path.write_text(text)
        with pytest.raises(CheckpointError, match=match):
            load_adapter(model, str(tmp_path))
    path.write_text(good)
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="holds no LoRA weights"):
        load_adapter(model, str(tmp_path))


def test_adapter_unsupported_options(tiny_checkpoint, tmp_path):
    model = load_model(tiny_checkpoint("llada"))
    make_adapter(model, str(tmp_path), "llada")
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["use_dora"] = True
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_adapter(model, str(tmp_path))


# --- bad checkpoints ------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path, tiny_checkpoint):
    """A private copy of a tiny sharded LLaDA checkpoint, free to break."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llada"), folder)
    return folder


def shard(folder, i=1):
    return folder / f"model-0000{i}-of-00002.safetensors"


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_missing_config(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(ckpt))


def test_missing_weights(ckpt):
    for name in os.listdir(ckpt):
        if "safetensors" in name:
            os.remove(ckpt / name)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(str(ckpt))
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="never pickle"):
        load_model(str(ckpt))


def test_missing_shard(ckpt):
    os.remove(shard(ckpt, 2))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(str(ckpt))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(ckpt, damage):
    data = shard(ckpt).read_bytes()
    shard(ckpt).write_bytes(b"\x13garbage" * 20 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        load_model(str(ckpt))


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gpt2"):
        load_model(str(ckpt))


def test_wrong_shape(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mlp_hidden_size"] = 200
    (ckpt / "config.json").write_text(json.dumps(cfg))
    bad = r"model\.transformer\.blocks\.\d\.(ff_proj|up_proj|ff_out)\.weight.*shape"
    with pytest.raises(CheckpointError, match=bad):
        load_model(str(ckpt))


def _rewrite(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor(ckpt):
    victim = sorted(load_file(str(shard(ckpt))))[0]
    _rewrite(shard(ckpt), lambda t: t.pop(victim))
    with pytest.raises(CheckpointError, match=f"lacks tensors: {victim}"):
        load_model(str(ckpt))


def test_saved_rope_frequencies_are_skipped(ckpt):
    expected = logits(load_model(str(ckpt)), ids_for(load_model(str(ckpt))))
    _rewrite(shard(ckpt), lambda t: t.update({"model.transformer.blocks.0.rotary_emb.inv_freq": torch.ones(4)}))
    model = load_model(str(ckpt))
    assert torch.equal(logits(model, ids_for(model)), expected)


def test_unexpected_tensor(ckpt):
    _rewrite(shard(ckpt), lambda t: t.update({"model.transformer.blocks.9.q_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.transformer\.blocks\.9\.q_proj\.weight'"):
        load_model(str(ckpt))


@pytest.mark.parametrize("arch,key", [("dream", "mask_token_id"), ("dream", "hidden_size"), ("llada", "d_model")])
def test_config_missing_key(arch, key, tmp_path):
    folder = write_tiny_checkpoint(str(tmp_path), arch=arch, tokenizer=False)
    cfg = json.loads(open(os.path.join(folder, "config.json")).read())
    del cfg[key]
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_dict(cfg)


def test_config_llada_mask_default_and_unsupported():
    from d2f_bench.tiny import llada_config
    cfg = llada_config(130000, 126336, 126081, 128, 2, 2, 1, 256, 64, False)
    del cfg["mask_token_id"]
    assert ModelConfig.from_dict(cfg).mask_token_id == 126336
    for key, value in (("alibi", True), ("clip_qkv", 8.0)):
        with pytest.raises(ValueError, match=f"{key}={value}"):
            ModelConfig.from_dict({**cfg, key: value})


def test_config_dream_head_dim_must_match_the_heads(tmp_path):
    folder = write_tiny_checkpoint(str(tmp_path), arch="dream", tokenizer=False)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert ModelConfig.from_dict({**cfg, "head_dim": head_dim}).head_dim == head_dim
    with pytest.raises(ValueError, match="head_dim=8 is not supported"):
        ModelConfig.from_dict({**cfg, "head_dim": 8})
