"""Every sample.py mode runs on tiny random-weight checkpoints and writes a PNG grid of the expected size + JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sample  # noqa: E402  (repository root, put on sys.path by conftest)
from unclip_pl.diffusion import ddim_invert, sample_ddim
from unclip_pl.pipeline import UnCLIPPipeline, stage_stream

from .conftest import GAUSS, IMG, ROOT, UP, D, build, compose, decoder_model, perturb_


def grid_size(n: int, nrow: int, side: int, pad: int = 2) -> tuple[int, int]:
    """(width, height) of torchvision's make_grid for n images of side x side."""
    cols = min(nrow, n)
    rows = -(-n // nrow)
    return cols * (side + pad) + pad, rows * (side + pad) + pad


def random_png(path: Path, w: int = 40, h: int = 30, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(arr).save(path)
    return path


def run_mode(tmp_path, pipe, overrides):
    cfg = compose(["checkpoints.decoder=unused", *overrides], tmp_path, config_name="sample")
    rec = sample.run(cfg, pipe=pipe)
    png, js = Path(rec["png"]), Path(rec["json"])
    assert png.parent == tmp_path and png.is_file() and js.is_file()
    saved = json.loads(js.read_text())
    assert saved["mode"] == cfg.mode and "settings" in saved and "checkpoints" in saved
    return Image.open(png).size, saved


def test_text(tmp_path, tiny_pipeline):
    size, rec = run_mode(tmp_path, tiny_pipeline, ["mode=text", "prompt=[red heart,blue car]", "n=2", "seed=5"])
    assert size == grid_size(4, 2, UP)
    assert rec["seeds"] == [5, 6, 7, 8] and rec["captions"] == ["red heart", "blue car"]
    assert rec["settings"]["decoder"]["steps"] == 3 and rec["checkpoints"]["decoder"].endswith("decoder.ckpt")


def test_text_from_file_no_prior(tmp_path, tiny_pipeline):
    f = tmp_path / "prompts.txt"
    f.write_text("smiling face\n\ngreen tree\n")
    size, rec = run_mode(tmp_path, tiny_pipeline, ["mode=text", f"prompts_file={f}", "n=1", "use_prior=false"])
    assert size == grid_size(2, 1, UP) and rec["use_prior"] is False


def test_variations_inverted(tmp_path, tiny_pipeline):
    img = random_png(tmp_path / "in.png")
    size, rec = run_mode(tmp_path, tiny_pipeline, ["mode=variations", f"image={img}", "n=2", "invert=true"])
    assert size == grid_size(3, 3, UP) and rec["invert"] is True and rec["eta"] == 0.5


def test_interpolate_generated_inputs(tmp_path, tiny_pipeline):
    size, rec = run_mode(tmp_path, tiny_pipeline, ["mode=interpolate", "prompt=[cat,dog]", "k=3"])
    assert size == grid_size(5, 5, UP) and rec["image"]["generated_from"] == "cat"


def test_textdiff(tmp_path, tiny_pipeline):
    img = random_png(tmp_path / "in.png", seed=1)
    size, rec = run_mode(tmp_path, tiny_pipeline, ["mode=textdiff", f"image={img}", "caption=cat face",
                                                   "new_caption=dog face", "thetas=[0,0.25,0.5]"])
    assert size == grid_size(4, 4, UP) and rec["thetas"] == [0.0, 0.25, 0.5]


def test_conditioning(tmp_path, tiny_pipeline):
    size, rec = run_mode(tmp_path, tiny_pipeline, ["mode=conditioning", "prompt=[sun,moon]"])
    assert size == grid_size(6, 2, UP) and rec["rows"] == ["caption_only", "text_emb", "prior"]


def test_guidance(tmp_path, tiny_pipeline):
    size, rec = run_mode(tmp_path, tiny_pipeline, ["mode=guidance", "prompt=star", "n=2", "scales=[1,4]"])
    assert size == grid_size(4, 2, UP) and rec["scales"] == [1.0, 4.0]


def test_probe(tmp_path, tiny_pipeline):
    img = random_png(tmp_path / "in.png", seed=2)
    size, rec = run_mode(tmp_path, tiny_pipeline, ["mode=probe", f"image={img}", "labels=[an apple,an iPod]",
                                                   "n=2"])
    assert size == grid_size(3, 3, UP)
    assert abs(sum(rec["probs"].values()) - 1.0) < 1e-4 and rec["top_label"] in ("an apple", "an iPod")


def test_usage_errors(tmp_path, tiny_pipeline):
    cfg = compose(["checkpoints.decoder=unused", "mode=textdiff"], tmp_path, config_name="sample")
    with pytest.raises(sample.SampleError, match="caption"):
        sample.run(cfg, pipe=tiny_pipeline)
    cfg = compose(["checkpoints.decoder=unused", "mode=nope"], tmp_path, config_name="sample")
    with pytest.raises(sample.SampleError, match="not a mode"):
        sample.run(cfg, pipe=tiny_pipeline)


def test_from_checkpoint_paths_clip_text_decoder(tmp_path, tiny):
    """Built from the config alone: the CLIP comes from the decoder checkpoint; a CLIP-states decoder, no upsampler."""
    size, rec = run_mode(tmp_path, None, ["mode=text", "prompt=[a,b,c]", "n=1", "device=cpu",
                                          f"checkpoints.decoder={tiny['decoder_clip']}", "use_prior=false",
                                          "settings.decoder.steps=2"])
    assert size == grid_size(3, 1, IMG) and rec["settings"]["decoder"]["steps"] == 2


def test_deterministic_seeds(tiny_pipeline):
    a = tiny_pipeline.text_to_image(["x", "y"], 1, seeds=[3, 4])
    b = tiny_pipeline.text_to_image(["x", "y"], 1, seeds=[3, 4])
    assert torch.equal(a, b)
    z = tiny_pipeline.embed_texts(["x"]).expand(2, -1)
    same_seed = tiny_pipeline.decode(z, ["x", "x"], seeds=[1, 1])
    assert torch.allclose(same_seed[0], same_seed[1], atol=1e-5)


def test_image_depends_only_on_its_caption_and_seed(tiny_pipeline):
    """Regenerating one image of a grid (its caption and seed alone) reproduces it: prior, decoder and upsampler
    noise are all drawn per item."""
    assert tiny_pipeline.prior is not None and tiny_pipeline.upsamplers
    grid, z = tiny_pipeline.text_to_image(["x", "y", "z"], 1, seeds=[3, 4, 5], return_embeddings=True)
    one, z_one = tiny_pipeline.text_to_image(["y"], 1, seeds=[4], return_embeddings=True)
    torch.testing.assert_close(z_one, z[1:2], atol=1e-5, rtol=1e-5)
    # equal up to float rounding (batch-size dependent kernels, amplified over the sampling steps)
    assert (one - grid[1:2]).abs().max() < 1e-2 and (one - grid[1:2]).abs().mean() < 1e-4
    other = tiny_pipeline.text_to_image(["y"], 1, seeds=[6])
    assert (other - grid[1:2]).abs().mean() > 1e-2
    streams = [stage_stream("prior"), stage_stream("decoder"), stage_stream("upsampler", 0),
               stage_stream("upsampler", 1)]
    assert len(set(streams)) == 4


# ------------------------------------------------------------------ figure 7: the caption-only row
def test_caption_only_row_is_the_decoders_learned_null(tiny_pipeline):
    """null_clip learned: the row is decoding with the decoder's learned null embedding, not with zeros."""
    pipe, caps, seeds = tiny_pipeline, ["sun", "moon"], [3, 4]
    null = pipe.decoder.null_clip_emb(2)
    assert pipe.decoder.null_clip == "learned" and null.abs().max() > 0
    rows = pipe.conditioning_ablation(caps, seeds)
    torch.testing.assert_close(rows["caption_only"], pipe.decode(null, caps, seeds), atol=1e-5, rtol=0)
    zeros = pipe.decode(torch.zeros_like(null), caps, seeds)
    assert (rows["caption_only"] - zeros).abs().max() > 1e-3


def test_caption_only_row_is_zeros_for_a_zeros_null(tiny):
    cfg = dict(decoder_model("own"), null_clip="zeros")
    dec = perturb_(build(cfg), seed=7).eval()
    pipe = UnCLIPPipeline(tiny["clip"], None, dec, [], settings={"decoder": {"steps": 3, "sampler": "ddim", "eta": 0.0,
                                                                             "guidance_scale": 2.0}})
    caps, seeds = ["sun", "moon"], [3, 4]
    rows = pipe.conditioning_ablation(caps, seeds)
    assert list(rows) == ["caption_only", "text_emb"]
    torch.testing.assert_close(rows["caption_only"], pipe.decode(torch.zeros(2, D), caps, seeds), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ variations from a DDIM inversion
class OracleUNet(torch.nn.Module):
    """An eps-predicting stand-in for the decoder's U-Net that knows the data (it ignores the conditioning):
    a single image ``x0`` (1, 3, S, S), or, with ``x0=None``, pixels ~ N(mu, std^2) independently."""

    def __init__(self, diffusion, x0=None, mu=0.0, std=0.3):
        super().__init__()
        self.in_channels = self.out_channels = 3
        self.clip_dim, self.image_size, self.learn_sigma = D, IMG, False
        self.diffusion, self.x0, self.mu, self.std = diffusion, x0, mu, std

    def forward(self, x, t, **cond):
        abar = self.diffusion.gather("abar", t, x)
        if self.x0 is not None:
            x0 = self.x0.to(x).expand_as(x)
        else:   # E[x0 | x_t] for Gaussian data
            x0 = self.mu + abar.sqrt() * self.std ** 2 / (abar * self.std ** 2 + 1 - abar) * (x - abar.sqrt() * self.mu)
        return self.diffusion.eps_from_x0(x, t, x0)


def oracle_pipeline(tiny, sampler, x0=None, steps=7, invert_steps=40):
    from unclip_pl.models.decoder import Decoder

    diffusion = build(GAUSS("eps"))
    dec = Decoder(OracleUNet(diffusion, x0), diffusion, text_encoder=None).eval()
    return UnCLIPPipeline(tiny["clip"], None, dec, [], settings={"decoder": {
        "sampler": sampler, "steps": steps, "eta": 0.0, "invert_steps": invert_steps, "guidance_scale": 3.0}})


def test_inverted_variations_at_eta_0_return_the_image_with_a_point_oracle(tiny):
    image = (torch.rand(3, IMG, IMG, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.9
    pipe = oracle_pipeline(tiny, "ddpm", x0=image[None])
    out = pipe.variations(image, n=2, invert=True, eta=0.0, seeds=[0, 1])
    torch.testing.assert_close(out, image[None].expand(2, -1, -1, -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m", "ddim"])
def test_inverted_variations_are_ddim_both_ways_whatever_the_sampler(tiny, sampler):
    """Data ~ N(0, 0.3^2) with its exact denoiser: the inversion is a non-trivial x_T, and DDIM at eta 0 maps it back
    to the image (up to the ODE's discretisation error) whatever the configured sampler and steps; eta > 0 does not."""
    image = (0.3 * torch.randn(3, IMG, IMG, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    pipe = oracle_pipeline(tiny, sampler, invert_steps=100)
    back = pipe.variations(image, n=2, invert=True, eta=0.0, seeds=[0, 1])
    assert torch.equal(back[0], back[1])                                   # deterministic at eta 0
    assert (back - image).abs().max() < 0.06, (back - image).abs().max()   # 0.04 at 100 steps; pixels ~ +-0.9
    vary = pipe.variations(image, n=2, invert=True, eta=0.8, seeds=[0, 1])
    assert (vary - back).abs().mean() > 0.05                               # eta > 0 changes the result ...
    assert (vary[0] - vary[1]).abs().mean() > 0.05                         # ... differently per seed


def test_inverted_variations_use_one_guided_model_and_clipping_both_ways(tiny):
    """Against the definition, with a real (tiny, random) decoder whose configured sampler is DPM-Solver++:
    DDIM inversion and DDIM sampling with the same steps, the same guided model function and x0 clipping."""
    from unclip_pl.checkpoint import load_stage

    dec = load_stage(tiny["decoder"]).model
    steps, g = 4, 2.5
    pipe = UnCLIPPipeline(tiny["clip"], None, dec, [], settings={"decoder": {
        "sampler": "dpmpp_2m", "steps": 6, "eta": 0.0, "invert_steps": steps, "guidance_scale": g,
        "variation_eta": 0.5}})
    image = torch.rand(3, IMG, IMG, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = pipe.embed_images(image)
    text = pipe._caption_states(["red heart"])
    model_fn = dec.guided_model(z, text=text, guidance_scale=g)
    x_T = ddim_invert(dec.diffusion, model_fn, image[None], steps=steps, clip_denoised=True)
    want = sample_ddim(dec.diffusion, model_fn, x_T, steps=steps, eta=0.0, clip_denoised=True).clamp(-1, 1)
    got = pipe.variations(image, n=2, invert=True, eta=0.0, seeds=[0, 1], caption="red heart")
    torch.testing.assert_close(got, want.expand(2, -1, -1, -1), atol=1e-5, rtol=0)
    vary = pipe.variations(image, n=2, invert=True, seeds=[0, 1], caption="red heart")   # variation_eta = 0.5
    assert (vary - got).abs().max() > 1e-3


@pytest.mark.slow
def test_sample_cli(tmp_path, tiny):
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), "mode=text", "prompt=heart", "n=2", "device=cpu",
                          f"checkpoints.decoder={tiny['decoder']}", f"checkpoints.prior={tiny['prior']}",
                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "text.png").is_file() and (tmp_path / "text.json").is_file()
