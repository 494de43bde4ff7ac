"""Build the bundled tiny Stable-Diffusion pipeline: data, tokenizer, models, training, export.

Shapes from models.synthdata with named colours → CLIP BPE tokenizer → tiny CLIPTextModel,
AutoencoderKL, UNet2DConditionModel and T2IAdapter from configs, trained briefly on the CPU
→ ONNX in the layout optimum exports (plus adapter/) and the diffusers weights for the tests.

    nice -n 10 python -m models.scripts.build_diffusion --out models/bundled/tiny-sd
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.diffusion.conditions import canny
from models.package import Hardware, Manifest, file_entry, write_manifest
from models.synthdata.shapes import CLASS_NAMES, Pose, rasterize, sample_aspect, unit_contours

SIZE = 64
MAX_TOKENS = 16
# BGR, as OpenCV and models.synthdata paint.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (40.0, 40.0, 220.0),
    "green": (50.0, 180.0, 50.0),
    "blue": (220.0, 90.0, 30.0),
    "yellow": (30.0, 220.0, 235.0),
    "white": (245.0, 245.0, 245.0),
    "black": (20.0, 20.0, 20.0),
    "orange": (20.0, 140.0, 250.0),
    "purple": (170.0, 40.0, 140.0),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "gray": (128.0, 128.0, 128.0),
    "light": (215.0, 225.0, 230.0),
    "dark": (60.0, 45.0, 40.0),
}
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


# --- data ---------------------------------------------------------------------------------


def scene(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One 64x64 BGR image of 1-2 shapes in named colours over a plain background, captioned."""
    bg_name = str(rng.choice(list(BACKGROUNDS)))
    canvas = np.empty((SIZE, SIZE, 3), np.float32)
    canvas[:] = np.asarray(BACKGROUNDS[bg_name], np.float32) * np.float32(rng.uniform(0.9, 1.1))
    canvas += rng.normal(0.0, 4.0, canvas.shape).astype(np.float32)
    count = 1 if rng.random() < 0.7 else 2
    parts = []
    for i in range(count):
        cls = int(rng.integers(len(CLASS_NAMES)))
        colour = str(rng.choice([c for c in COLOURS if not (bg_name == "light" and c == "white")]))
        size = rng.uniform(26, 44) if count == 1 else rng.uniform(18, 30)
        if count == 1:
            cx, cy = rng.uniform(24, 40, 2)
        else:  # left and right halves, so both stay visible
            cx, cy = (16 + 32 * i + rng.uniform(-3, 3)), rng.uniform(20, 44)
        pose = Pose(float(cx), float(cy), float(size), sample_aspect(cls, rng), rng.uniform(0, 360))
        alpha, x0, y0 = rasterize(pose.apply(unit_contours(cls, rng)))
        h, w = alpha.shape
        ys, xs = slice(max(y0, 0), min(y0 + h, SIZE)), slice(max(x0, 0), min(x0 + w, SIZE))
        a = alpha[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0][..., None]
        paint = np.asarray(COLOURS[colour], np.float32) * np.float32(rng.uniform(0.85, 1.1))
        canvas[ys, xs] = canvas[ys, xs] * (1.0 - a) + paint * a
        parts.append(f"a {colour} {CLASS_NAMES[cls]}")
    caption = " and ".join(parts) + f" on a {bg_name} background"
    return np.clip(canvas, 0, 255).astype(np.uint8), caption


def dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images [n,3,64,64] in -1..1 (RGB), Canny maps [n,1,64,64] in 0..1, captions."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, SIZE, SIZE), np.float32)
    edges = np.empty((n, 1, SIZE, SIZE), np.float32)
    captions = []
    for i in range(n):
        bgr, caption = scene(rng)
        images[i] = bgr[..., ::-1].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        edges[i] = canny(bgr, SIZE, SIZE)[0]
        captions.append(caption)
    return images, edges, captions


# --- tokenizer and models -----------------------------------------------------------------


def build_tokenizer(captions: list[str], out: Path) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(sorted(set(captions)), trainer)
    tmp = out / "_bpe"
    tmp.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(tmp))
    vocab = json.loads((tmp / "vocab.json").read_text())
    merges = [
        tuple(line.split())
        for line in (tmp / "merges.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    shutil.rmtree(tmp)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)  # type: ignore[arg-type, unused-ignore]


def build_models(vocab_size: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL, T2IAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            attn_implementation="eager",
        )  # type: ignore[call-arg, unused-ignore]
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    adapter = T2IAdapter(
        in_channels=1,
        channels=[32, 64],
        num_res_blocks=1,
        downscale_factor=4,
        adapter_type="full_adapter",
    )
    return {"text_encoder": text, "vae": vae, "unet": unet, "adapter": adapter}


def alphas_cumprod() -> torch.Tensor:
    lo, hi = float(SCHEDULER["beta_start"]), float(SCHEDULER["beta_end"])  # type: ignore[arg-type]
    betas = torch.linspace(lo**0.5, hi**0.5, 1000) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# --- training -----------------------------------------------------------------------------


def _lr(step: int, steps: int, peak: float) -> float:
    warm = max(steps // 20, 1)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))


def train_vae(vae: Any, images: np.ndarray, steps: int, batch: int) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(1)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 1e-3)
        x = torch.from_numpy(images[rng.integers(0, len(images), batch)])
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-3 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(
                f"vae {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True
            )
    vae.eval()


@torch.no_grad()
def encode_latents(vae: Any, images: np.ndarray) -> torch.Tensor:
    out = [
        vae.encode(torch.from_numpy(images[i : i + 256])).latent_dist.mean
        for i in range(0, len(images), 256)
    ]
    return torch.cat(out)


def train_unet(
    models: dict[str, Any],
    latents: torch.Tensor,
    ids: torch.Tensor,
    empty: torch.Tensor,
    steps: int,
    batch: int,
    edges: torch.Tensor | None = None,
) -> None:
    """Epsilon-prediction DDPM training; with `edges`, only the adapter learns."""
    unet, text, adapter = models["unet"], models["text_encoder"], models["adapter"]
    if edges is None:
        params = list(unet.parameters()) + list(text.parameters())
        peak, drop = 1e-3, 0.1
    else:
        params = list(adapter.parameters())
        peak, drop = 1e-3, 0.3
        unet.requires_grad_(False)
        text.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.0)
    acp = alphas_cumprod()
    gen = torch.Generator().manual_seed(2 if edges is None else 3)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, peak)
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        tok = ids[idx].clone()
        tok[torch.rand(batch, generator=gen) < drop] = empty
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        hidden = text(tok).last_hidden_state
        extra = {}
        if edges is not None:
            extra["down_intrablock_additional_residuals"] = adapter(edges[idx])
        pred = unet(noisy, t, hidden, **extra).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            name = "unet" if edges is None else "adapter"
            print(
                f"{name} {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)",
                flush=True,
            )


# --- export -------------------------------------------------------------------------------


class _TextEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids.long())
        return out.last_hidden_state, out.pooler_output


class _Unet(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: Any, timestep: Any, hidden: Any, *residuals: Any) -> torch.Tensor:
        extra = {"down_intrablock_additional_residuals": list(residuals)} if residuals else {}
        return self.model(sample, timestep, hidden, **extra).sample


class _VaeDecoder(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent_sample).sample


class _Adapter(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, condition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(condition))


def _export(
    module: nn.Module,
    args: tuple[Any, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    axes: dict[str, dict[int, str]],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module.eval(),
        args,
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )


def export_onnx(models: dict[str, Any], out: Path) -> list[str]:
    """The optimum layout (text_encoder/, unet/, vae_decoder/) plus adapter/; file names."""
    unet = models["unet"]
    feats = models["adapter"](torch.zeros(2, 1, SIZE, SIZE))
    res_names = [f"adapter_residual_{i}" for i in range(len(feats))]
    with torch.no_grad():
        _export(
            _TextEncoder(models["text_encoder"]),
            (torch.zeros(1, MAX_TOKENS, dtype=torch.int32),),
            out / "text_encoder/model.onnx",
            ["input_ids"],
            ["last_hidden_state", "pooler_output"],
            {
                "input_ids": {0: "batch"},
                "last_hidden_state": {0: "batch"},
                "pooler_output": {0: "batch"},
            },
        )
        lat = SIZE // 4
        _export(
            _Unet(unet),
            (torch.zeros(2, 4, lat, lat), torch.ones(2), torch.zeros(2, MAX_TOKENS, 32), *feats),
            out / "unet/model.onnx",
            ["sample", "timestep", "encoder_hidden_states", *res_names],
            ["out_sample"],
            {
                "sample": {0: "batch", 2: "height", 3: "width"},
                "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch"},
                **{n: {0: "batch", 2: f"h{i}", 3: f"w{i}"} for i, n in enumerate(res_names)},
                "out_sample": {0: "batch", 2: "height", 3: "width"},
            },
        )
        _export(
            _VaeDecoder(models["vae"]),
            (torch.zeros(1, 4, lat, lat),),
            out / "vae_decoder/model.onnx",
            ["latent_sample"],
            ["sample"],
            {
                "latent_sample": {0: "batch", 2: "height", 3: "width"},
                "sample": {0: "batch", 2: "h", 3: "w"},
            },
        )
        _export(
            _Adapter(models["adapter"]),
            (torch.zeros(1, 1, SIZE, SIZE),),
            out / "adapter/model.onnx",
            ["condition"],
            res_names,
            {
                "condition": {0: "batch", 2: "height", 3: "width"},
                **{n: {0: "batch", 2: f"h{i}", 3: f"w{i}"} for i, n in enumerate(res_names)},
            },
        )
    for name, key in (
        ("text_encoder", "text_encoder"),
        ("unet", "unet"),
        ("vae_decoder", "vae"),
        ("adapter", "adapter"),
    ):
        cfg = dict(models[key].config) if key != "text_encoder" else models[key].config.to_dict()
        (out / name / "config.json").write_text(
            json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n"
        )
    return [
        "text_encoder/model.onnx",
        "unet/model.onnx",
        "vae_decoder/model.onnx",
        "adapter/model.onnx",
    ]


def save_package(models: dict[str, Any], tokenizer: Any, out: Path, note: str) -> None:
    from diffusers import DDIMScheduler

    out.mkdir(parents=True, exist_ok=True)
    onnx_files = export_onnx(models, out)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    scheduler: Any = DDIMScheduler(**SCHEDULER)
    scheduler.save_config(str(out / "scheduler"))
    ref = out / "diffusers"  # torch weights for the reference tests; not part of the package
    for key in ("unet", "vae", "text_encoder", "adapter"):
        models[key].save_pretrained(str(ref / key))
    tokenizer.save_pretrained(str(ref / "tokenizer"))
    scheduler.save_config(str(ref / "scheduler"))
    index = {
        "_class_name": "ORTStableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "text_encoder": ["optimum", "ORTModelTextEncoder"],
        "unet": ["optimum", "ORTModelUnet"],
        "vae_decoder": ["optimum", "ORTModelVaeDecoder"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "adapter": ["diffusers", "T2IAdapter"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    listed = [
        "model_index.json",
        *onnx_files,
        *(f"{d}/config.json" for d in ("text_encoder", "unet", "vae_decoder", "adapter")),
        "scheduler/scheduler_config.json",
        *sorted(f"tokenizer/{p.name}" for p in (out / "tokenizer").iterdir()),
    ]
    manifest = Manifest(
        name="tiny-sd",
        version="0.1.0",
        task="diffusion",
        family="stable-diffusion",
        runtime="onnx",
        precision="fp32",
        model="unet/model.onnx",
        files=[file_entry(out, f) for f in listed],
        params={
            "layout": "optimum",
            "image_size": [SIZE, SIZE],
            "size_multiple": 8,
            "vae_scale_factor": 4,
            "scaling_factor": float(models["vae"].config.scaling_factor),
            "max_tokens": MAX_TOKENS,
            "adapter": {"condition": "canny", "in_channels": 1},
            "default_scheduler": "ddim",
            "default_steps": 20,
            "default_guidance": 4.0,
            "colours": list(COLOURS),
            "shapes": list(CLASS_NAMES),
            "backgrounds": list(BACKGROUNDS),
            "weights": note,
        },
        hardware=Hardware(min_memory_mb=128),
        description="Tiny Stable-Diffusion-style pipeline (CLIP text encoder, UNet with adapter "
        "residual inputs, AutoencoderKL decoder, T2I-Adapter on Canny edges), 64x64 px, trained "
        "briefly on synthetic shapes with captions like 'a red circle on a gray background'. "
        "diffusers/ holds the same weights for torch, used by the reference tests only.",
    )
    write_manifest(out, manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/bundled/tiny-sd"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/tiny-sd-work"))
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--adapter-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    args.work.mkdir(parents=True, exist_ok=True)
    images, edges, captions = dataset(args.images, seed=0)
    tokenizer = build_tokenizer(captions, args.work)
    models = build_models(len(tokenizer))
    print({k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}, flush=True)
    ckpt = args.work / "models.pt"
    if ckpt.exists():
        state = torch.load(ckpt)
        for key, model in models.items():
            model.load_state_dict(state["models"][key])
        done = state["done"]
    else:
        done = []
    if "vae" not in done:
        train_vae(models["vae"], images, args.vae_steps, args.batch)
        done.append("vae")
        torch.save({"models": {k: m.state_dict() for k, m in models.items()}, "done": done}, ckpt)
    latents = encode_latents(models["vae"], images)
    scale = float(1.0 / latents.std())
    models["vae"].register_to_config(scaling_factor=scale)
    latents = latents * scale
    ids = torch.tensor(
        tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids
    )
    empty = torch.tensor(tokenizer([""], padding="max_length", max_length=MAX_TOKENS).input_ids[0])
    if "unet" not in done:
        train_unet(models, latents, ids, empty, args.unet_steps, args.batch)
        done.append("unet")
        torch.save({"models": {k: m.state_dict() for k, m in models.items()}, "done": done}, ckpt)
    if "adapter" not in done:
        train_unet(
            models, latents, ids, empty, args.adapter_steps, args.batch, torch.from_numpy(edges)
        )
        done.append("adapter")
        torch.save({"models": {k: m.state_dict() for k, m in models.items()}, "done": done}, ckpt)
    for model in models.values():
        model.eval()
    note = (
        f"synthetic shapes, {args.images} images: VAE {args.vae_steps} steps, UNet+text "
        f"{args.unet_steps} steps, adapter {args.adapter_steps} steps, batch {args.batch} (AdamW)"
    )
    if args.out.exists():
        shutil.rmtree(args.out)
    save_package(models, tokenizer, args.out, note)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
