"""Train the embedded demo model: Stable Diffusion's architecture, small, on the procedural scenes dataset.

    python -m sdrt.demo.train OUT_DIR [--seed 0]

Three stages, each a fixed number of steps from a fixed seed so the run is reproducible (on the same torch build):
1. the KL VAE learns to reconstruct 64x64 renders (MSE + a small KL term, as a plain autoencoder would);
2. every training image is encoded once; the VAE scaling factor is measured as 1 / std of the latents, as SD's
   0.18215 was;
3. the U-Net and the CLIP text encoder learn v-prediction under DDPM's linear noise schedule, the one the saved
   PNDM scheduler config names (DEMO_SCHEDULER_CONFIG says why not SD 1.5's epsilon and scaled-linear). Captions
   name a random subset of the scene's attributes, and 10 % are empty, so the model follows partial prompts,
   negative prompts and classifier-free guidance. The U-Net runs in bf16 autocast (twice as fast on AVX-512 BF16
   CPUs); the weights saved are an exponential moving average.

Needs the export extra (torch, diffusers, transformers). Writes a diffusers checkpoint with fp16 safetensors.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm import tqdm

from sdrt.demo.scenes import ALL_ATTRIBUTES, Attribute, Scene, render, training_scenes
from sdrt.engine.tokenizer import CLIPTokenizer
from sdrt.export.random_checkpoint import ARCHES, SD15_SCHEDULER_CONFIG, Models, build_models, save_checkpoint
from sdrt.export.clip_vocab import clip_merges, clip_vocab

logger = logging.getLogger(__name__)

DEMO_ARCH = ARCHES["demo"]
# Where the object goes is decided in the noisiest steps. v-prediction (SD 2's choice) makes the loss there an error on
# the image itself; epsilon prediction weighs it by alpha_bar / (1 - alpha_bar), next to nothing, and the v1 model
# trained that way read the position from the noise and ignored the position words. DDPM's own linear schedule ends at
# alpha_bar 4e-5, where SD's scaled-linear one (0.0047) still leaves enough image in x_T to betray the position.
DEMO_SCHEDULER_CONFIG = {
    **SD15_SCHEDULER_CONFIG,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "v_prediction",
}
IMAGE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every number the training run depends on."""

    seed: int = 0
    num_images: int = 12288  # jittered renders of the training scenes, encoded once
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 1800
    unet_batch: int = 64
    unet_lr: float = 5e-4
    text_encoder_lr: float = 5e-4
    warmup_steps: int = 100
    ema_decay: float = 0.995
    empty_caption_rate: float = 0.1
    partial_caption_rate: float = 0.3
    grad_clip: float = 1.0


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]


def render_dataset(config: TrainConfig, rng: np.random.Generator) -> tuple[torch.Tensor, list[Scene]]:
    """`num_images` jittered renders cycling over the training scenes (held-out combinations never appear)."""
    scenes = training_scenes()
    chosen = [scenes[i % len(scenes)] for i in range(config.num_images)]
    images = np.stack([render(scene, (IMAGE_SIZE, IMAGE_SIZE), rng) for scene in chosen])  # (N, 64, 64, 3)
    return _pixels(images), chosen


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(models: Models, pixels: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> None:
    vae = models.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.vae_steps, config.warmup_steps))
    for step in (bar := tqdm(range(config.vae_steps), desc="VAE", unit="step")):
        batch = pixels[torch.randint(len(pixels), (config.vae_batch,), generator=generator)]  # (b, 3, 64, 64)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_latents(models: Models, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every image: (N, C, h, w) each."""
    means, stds = [], []
    for start in tqdm(range(0, len(pixels), batch), desc="encode", unit="batch"):
        posterior = models.vae.encode(pixels[start : start + batch]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


class CaptionSampler:
    """Captions naming a random subset of a scene's attributes, tokenized once per distinct caption."""

    def __init__(self, tokenizer: CLIPTokenizer, config: TrainConfig, rng: np.random.Generator) -> None:
        self._tokenizer = tokenizer
        self._config = config
        self._rng = rng
        self._ids: dict[str, np.ndarray] = {}
        self._attributes = sorted(ALL_ATTRIBUTES, key=lambda a: a.value)

    def _subset(self) -> frozenset[Attribute]:
        draw = self._rng.random()
        if draw < self._config.empty_caption_rate:
            return frozenset()
        if draw < self._config.empty_caption_rate + self._config.partial_caption_rate:
            keep = self._rng.random(len(self._attributes)) < 0.5
            return frozenset(a for a, k in zip(self._attributes, keep) if k)
        return ALL_ATTRIBUTES

    def token_ids(self, scenes: list[Scene]) -> torch.Tensor:
        captions = [scene.caption(self._subset()) for scene in scenes]
        for caption in captions:
            if caption not in self._ids:
                self._ids[caption] = self._tokenizer(caption)[0]
        return torch.from_numpy(np.stack([self._ids[c] for c in captions]))  # (b, 77)


def train_denoiser(
    models: Models,
    latents: tuple[torch.Tensor, torch.Tensor],
    scenes: list[Scene],
    captions: CaptionSampler,
    config: TrainConfig,
    generator: torch.Generator,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Train the U-Net and text encoder on v-prediction; returns their exponential moving averages."""
    unet, text_encoder = models.unet.train(), models.text_encoder.train()
    noise_schedule = DDPMScheduler.from_config(DEMO_SCHEDULER_CONFIG)
    alphas_cumprod = noise_schedule.alphas_cumprod  # (T,)
    optimizer = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "lr": config.unet_lr},
            {"params": text_encoder.parameters(), "lr": config.text_encoder_lr},
        ],
        weight_decay=1e-2,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.unet_steps, config.warmup_steps))
    trained = torch.nn.ModuleList([text_encoder, unet])
    ema = copy.deepcopy(trained).eval().requires_grad_(False)
    means, stds = latents
    scaling = models.vae.config.scaling_factor
    for step in (bar := tqdm(range(config.unet_steps), desc="U-Net + text encoder", unit="step")):
        index = torch.randint(len(means), (config.unet_batch,), generator=generator)
        clean = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling  # (b, C, h, w)
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(noise_schedule.config.num_train_timesteps, (config.unet_batch,), generator=generator)
        alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)  # (b, 1, 1, 1)
        noisy = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise
        ids = captions.token_ids([scenes[i] for i in index.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            text = text_encoder(ids).last_hidden_state  # (b, 77, D)
            prediction = unet(noisy, timesteps, text).sample
        loss = F.mse_loss(prediction.float(), noise_schedule.get_velocity(clean, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), trained.parameters()):
                averaged.lerp_(current, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema[0], ema[1]


def train(out_dir: Path, config: TrainConfig = TrainConfig()) -> Path:
    """Run all three stages and save the checkpoint to `out_dir` (atomically). Returns its path."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    models = build_models(DEMO_ARCH)
    pixels, scenes = render_dataset(config, rng)
    train_vae(models, pixels, config, generator)
    means, stds = encode_latents(models, pixels)
    samples = means + stds * torch.randn(means.shape, generator=generator)
    models.vae.register_to_config(scaling_factor=float(1.0 / samples.std()))
    logger.info("VAE scaling factor %.5f", models.vae.config.scaling_factor)
    merges = clip_merges()
    tokenizer = CLIPTokenizer(clip_vocab(merges), [tuple(m.split(" ")) for m in merges], pad_token=DEMO_ARCH.pad_token)
    text_encoder, unet = train_denoiser(models, (means, stds), scenes, CaptionSampler(tokenizer, config, rng), config, generator)
    trained = Models(vae=models.vae, text_encoder=text_encoder, unet=unet)
    save_checkpoint(out_dir, trained, DEMO_ARCH.pad_token, dtype=torch.float16, scheduler_config=DEMO_SCHEDULER_CONFIG)
    logger.info("trained the demo model in %.1f min -> %s", (time.perf_counter() - started) / 60, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdrt.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="where to write the diffusers checkpoint (must not exist)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = TrainConfig(seed=args.seed, unet_steps=args.unet_steps, vae_steps=args.vae_steps)
    train(args.out_dir, config)


if __name__ == "__main__":
    main()
