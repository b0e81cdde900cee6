"""The pipeline with a Karlo-layout decoder (CLIP's text embedding on the time embedding, the empty caption as the
unconditional branch): decoding and inverted variations give it both, the caption reaches the images, and no
caption is the empty caption."""
import torch

from tests.pipeline.conftest import IMG, D, W
from unclip_pl.diffusion import GaussianDiffusion, get_betas
from unclip_pl.models.decoder import Decoder
from unclip_pl.nets.unet import UNet
from unclip_pl.pipeline import UnCLIPPipeline


def karlo_like_decoder() -> Decoder:
    torch.manual_seed(0)
    unet = UNet(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), image_size=IMG,
                num_head_channels=16, learn_sigma=True, clip_dim=D, num_clip_tokens=4, context_dim=32,
                context_in_dim=W, text_emb_dim=D, resblock_updown=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    diffusion = GaussianDiffusion(get_betas("cosine", 1000), learn_sigma=True, loss="hybrid")
    return Decoder(unet, diffusion, text_encoder=None, clip_scale=1.0).eval()


@torch.no_grad()
def test_decode_and_inverted_variations_with_a_karlo_layout_decoder(tiny):
    decoder = karlo_like_decoder()
    settings = {"decoder": {"steps": 3, "sampler": "ddpm", "eta": 0.0, "guidance_scale": 3.0, "invert_steps": 3,
                            "variation_eta": 0.5}}
    pipe = UnCLIPPipeline(tiny["clip"], None, decoder, settings=settings, device="cpu")
    z = torch.nn.functional.normalize(torch.randn(2, D, generator=torch.Generator().manual_seed(2)), dim=-1)
    a = pipe.decode(z, ["a red heart", "a red heart"], seeds=[0, 1])
    b = pipe.decode(z, ["a blue car", None], seeds=[0, 1])
    assert a.shape == (2, 3, IMG, IMG)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3       # the caption (and its text embedding) matters
    assert torch.equal(pipe.decode(z, ["a red heart", "a red heart"], seeds=[0, 1]), a)
    # no caption is the empty caption, as the unconditional branch sees it
    assert torch.allclose(pipe.decode(z, [None, "a blue car"], seeds=[0, 1]), pipe.decode(z, ["", "a blue car"],
                                                                                          seeds=[0, 1]), atol=1e-5)
    image = torch.rand(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(3)) * 2 - 1
    out = pipe.variations(image, n=2, invert=True, caption="a red heart", seeds=[0, 1])
    assert out.shape == (2, 3, IMG, IMG) and torch.isfinite(out).all()
