"""DecoderModule / UpsamplerModule: a couple of training steps, validation loss and a logged sample grid (PNG)."""
import functools
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from unclip_pl.data.degrade import gaussian_blur
from unclip_pl.diffusion import GaussianDiffusion, get_betas
from unclip_pl.lit.decoder import DecoderModule
from unclip_pl.lit.upsampler import UpsamplerModule
from unclip_pl.models.decoder import Decoder
from unclip_pl.models.upsampler import Upsampler
from unclip_pl.nets.text import TextEncoder
from unclip_pl.nets.unet import UNet


def items(n, size, D=16):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(3, size, size, generator=g) * 2 - 1,
             "img_emb": torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0),
             "tokens": torch.cat([torch.randint(1, 100, (6,), generator=g), torch.zeros(4, dtype=torch.long)])}
            for _ in range(n)]


def fit(module, data, tmp_path):
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, val_check_interval=2,
                         num_sanity_val_steps=0, logger=CSVLogger(tmp_path, name="csv", version=""),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(data, batch_size=4)
    trainer.fit(module, loader, loader)
    return trainer


def test_decoder_module_trains_validates_and_logs_grid(tmp_path):
    torch.manual_seed(0)
    unet = UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), image_size=16,
                num_head_channels=16, clip_dim=16, context_dim=32)
    model = Decoder(unet, GaussianDiffusion(get_betas("cosine", 1000)),
                    TextEncoder(vocab_size=100, context_length=10, width=32, layers=1, heads=2))
    module = DecoderModule(model, functools.partial(torch.optim.AdamW, lr=1e-3), ema_decay=0.9, channels_last=True,
                           num_grid_items=3, sample={"steps": 3, "sampler": "ddim", "eta": 0.0, "guidance_scale": 2.0})
    trainer = fit(module, items(8, 16), tmp_path)
    assert "val/loss" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics
    pngs = list(Path(tmp_path).rglob("samples/*.png"))
    assert len(pngs) == 1
    assert module.sample_grid_items().shape == (3, 3, 16, 16)


def test_upsampler_module_trains_validates_and_logs_grid(tmp_path):
    torch.manual_seed(0)
    unet = UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=[], image_size=32,
                low_res_channels=3)
    model = Upsampler(unet, GaussianDiffusion(get_betas("cosine", 1000)), low_res_size=16, degradation=gaussian_blur)
    module = UpsamplerModule(model, functools.partial(torch.optim.AdamW, lr=1e-3), ema_decay=None,
                             num_grid_items=2, sample={"steps": 3, "sampler": "ddim", "eta": 0.0})
    trainer = fit(module, [{"image": d["image"]} for d in items(8, 32)], tmp_path)
    assert "val/loss" in trainer.callback_metrics
    assert len(list(Path(tmp_path).rglob("samples/*.png"))) == 1
    low, samples = module.sample_grid_items()
    assert low.shape == (2, 3, 16, 16) and samples.shape == (2, 3, 32, 32)
