"""FrozenCLIP, the small CLIP architecture, export/load and the loaders' error paths (no network)."""

from __future__ import annotations

import os
import pickle
import time

import pytest
import torch

from unclip_pl.clip.frozen import CLIPLoadError, FrozenCLIP, TextEncoding, load_clip, trim_tokens
from unclip_pl.clip.small import build_small_clip, export_clip, small_clip_config

os.environ["HF_HUB_OFFLINE"] = "1"

TINY = dict(
    embed_dim=32,
    vision_cfg={"image_size": 32, "width": 32, "layers": 1, "head_width": 16, "patch_size": 8},
    text_cfg={"width": 48, "heads": 2, "layers": 2},
)
CAPTIONS = ["grinning face with big eyes", "red heart", "a dog!", "face with tears of joy and a very long caption"]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_small_clip(**TINY)


@pytest.fixture()
def frozen(tiny_model):
    return FrozenCLIP(tiny_model, model_name="unclip-tiny")


def test_unclip_tiny_size():
    model = build_small_clip()
    n = sum(p.numel() for p in model.parameters())
    assert 7e6 < n < 9e6
    assert model.token_embedding.weight.numel() > n / 2  # most of it is the token table
    import open_clip

    assert "unclip-tiny" in open_clip.list_models()


def test_frozen_attributes_and_eval(frozen):
    assert (frozen.embed_dim, frozen.text_width, frozen.context_length, frozen.image_size) == (32, 48, 77, 32)
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training and not any(m.training for m in frozen.modules())
    parent = torch.nn.Sequential(frozen)
    parent.train()
    assert not frozen.model.training
    assert isinstance(frozen.fingerprint, str) and len(frozen.fingerprint) == 12
    assert frozen.fingerprint == frozen.fingerprint


def test_tokenizer_trims_on_cpu_and_pickles(frozen):
    raw = frozen.tokenizer(CAPTIONS)
    assert raw.dtype == torch.int64 and raw.shape == (4, 77)
    longest = int(raw.argmax(-1).max()) + 1                 # start .. end token of the longest caption
    t = frozen.tokenize(CAPTIONS)
    assert t.shape == (4, -(-longest // 8) * 8) and t.shape[1] < 77  # rounded up to a multiple of 8
    assert torch.equal(t, raw[:, :t.shape[1]]) and not raw[:, t.shape[1]:].any()  # only padding was cut
    loader_tok = pickle.loads(pickle.dumps(frozen.loader_tokenizer))  # what loader workers get
    assert torch.equal(loader_tok(CAPTIONS), t)
    assert trim_tokens(raw[:, :longest + 1], multiple=8).shape[1] == longest + 1  # capped at the given length
    frozen.trim = False
    assert frozen.tokenize(CAPTIONS).shape == (4, 77)
    frozen.trim = True


def test_encode_image_resizes_and_normalises(frozen):
    x = torch.rand(3, 3, 72, 72) * 2 - 1
    emb = frozen.encode_image(x)
    assert emb.shape == (3, 32) and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_encode_text_trimmed_equals_untrimmed(frozen, tiny_model):
    tokens = frozen.tokenizer(CAPTIONS)  # untrimmed (B, 77): encode_text trims CPU tokens itself
    enc = frozen.encode_text(tokens)
    assert isinstance(enc, TextEncoding)
    n_real = tokens.argmax(-1) + 1  # start .. end token
    assert enc.tokens.shape == (4, -(-int(n_real.max()) // 8) * 8, 48) and enc.tokens.shape[1] < 77
    assert torch.equal(enc.mask.sum(-1), n_real)
    torch.testing.assert_close(enc.emb.norm(dim=-1), torch.ones(4))
    frozen.trim = False
    full = frozen.encode_text(tokens)
    frozen.trim = True
    assert full.tokens.shape == (4, 77, 48)
    torch.testing.assert_close(enc.emb, full.emb, atol=1e-5, rtol=1e-5)
    L = enc.tokens.shape[1]
    real = enc.mask
    torch.testing.assert_close(enc.tokens[real], full.tokens[:, :L][real], atol=1e-5, rtol=1e-5)
    # and it matches open_clip's own text encoder
    ref = tiny_model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(enc.emb, ref, atol=1e-5, rtol=1e-5)


def test_export_load_round_trip(tmp_path, frozen, tiny_model):
    path = export_clip(tiny_model, "unclip-tiny", small_clip_config(**TINY), tmp_path / "clip" / "tiny.pt")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = load_clip("unclip-tiny", checkpoint=str(path), embed_dim=32, text_width=48, context_length=77,
                       image_size=32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = frozen.tokenize(CAPTIONS[:2])
    assert torch.equal(loaded.encode_image(x), frozen.encode_image(x))
    assert torch.equal(loaded.encode_text(tokens).emb, frozen.encode_text(tokens).emb)
    assert loaded.fingerprint == frozen.fingerprint
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_load_plain_state_dict(tmp_path):
    model = build_small_clip()
    path = tmp_path / "sd.pt"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    loaded = load_clip("unclip-tiny", checkpoint=path)
    tokens = loaded.tokenizer(["red heart"])  # full context length, as open_clip's own encode_text needs
    torch.testing.assert_close(loaded.encode_text(tokens).emb, model.encode_text(tokens, normalize=True))


def test_expect_mismatch_names_key(tmp_path, tiny_model):
    path = export_clip(tiny_model, "unclip-tiny", small_clip_config(**TINY), tmp_path / "tiny.pt")
    with pytest.raises(CLIPLoadError, match="embed_dim"):
        load_clip("unclip-tiny", checkpoint=path, embed_dim=128)


def test_mismatched_checkpoint_lists_keys(tmp_path, tiny_model):
    path = tmp_path / "bad.pt"
    sd = build_small_clip().state_dict()  # full-size unclip-tiny weights...
    sd.pop("ln_final.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CLIPLoadError) as err:
        load_clip("unclip-tiny", checkpoint=path)
    msg = str(err.value)
    assert "ln_final.weight" in msg and "extra.weight" in msg
    # ...and an export whose shapes disagree with its own config
    cfg = small_clip_config(**TINY)
    torch.save({"model_name": "unclip-tiny", "model_cfg": cfg, "state_dict": build_small_clip().state_dict()},
               tmp_path / "shapes.pt")
    with pytest.raises(CLIPLoadError, match=r"does not fit the unclip-tiny architecture[\s\S]*shape mismatch: "
                                           r"positional_embedding: model \(77, 48\), checkpoint \(77, 128\)"):
        load_clip("unclip-tiny", checkpoint=tmp_path / "shapes.pt")


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(CLIPLoadError, match="not found.*clip.loader.checkpoint"):
        load_clip("unclip-tiny", checkpoint=tmp_path / "nope.pt")


def test_pretrained_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(CLIPLoadError, match=r"clip\.loader\.checkpoint=/path/to/weights"):
        load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5.0


def test_unknown_tag_lists_choices():
    with pytest.raises(CLIPLoadError, match="laion2b_s34b_b79k"):
        load_clip("ViT-B-32", pretrained="no_such_tag")


def test_pretrained_cache_lookup(tmp_path):
    """A weights file already in the huggingface_hub cache is found without any network call."""
    import open_clip

    from unclip_pl.clip.frozen import _cached_pretrained_file

    pcfg = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    repo_id = pcfg["hf_hub"].rstrip("/")
    assert _cached_pretrained_file(pcfg, str(tmp_path))[0] is None
    repo = tmp_path / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"x")
    found, _ = _cached_pretrained_file(pcfg, str(tmp_path))
    assert found is not None and found.endswith("open_clip_pytorch_model.bin")
