"""Train YOLOX-Nano on the synthetic shapes data set on a CPU; resumable, EMA exported.

Build-time only. The YOLOX recipe scaled to a short CPU run: the official loss (SimOTA,
IoU/obj/cls, L1 in the last phase) from pixeltable-yolox's head, mosaic + affine scale,
HSV and flip, EMA weights, warm-up + cosine LR. Letterbox identical to inference.

    .venv/bin/python -m models.scripts.train_yolox --steps 3000        # train (or --resume)
    .venv/bin/python -m models.scripts.train_yolox --init runs/a/last.pt --out runs/b  # more
    .venv/bin/python -m models.scripts.train_yolox --bench 20          # s/step per size

Checkpoints in `runs/yolox_nano/`: `last.pt` (everything, for `--resume`) and `best.pt`
(EMA weights under 'model', the best quick val mAP@.5); both load in `build_yolox.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.scripts.yolox_arch import build_nano
from models.scripts.yolox_import import state_from_onnx
from models.yolox.postprocess import postprocess
from models.yolox.preprocess import PAD_VALUE, Letterbox

MAX_LABELS = 64
EVAL_SIZE = 416


# --------------------------------------------------------------------------- data


@dataclass
class Sample:
    path: Path
    boxes: np.ndarray  # (n, 5) float32: x1, y1, x2, y2, class (0-based)


def load_split(root: Path, split: str) -> tuple[list[Sample], dict[str, Any]]:
    """The split's images with their boxes (COCO x,y,w,h -> x1,y1,x2,y2, class id - 1)."""
    coco = json.loads((root / f"instances_{split}.json").read_text(encoding="utf-8"))
    per_image: dict[int, list[list[float]]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        per_image[ann["image_id"]].append([x, y, x + w, y + h, ann["category_id"] - 1])
    samples = [
        Sample(
            root / split / img["file_name"],
            np.asarray(per_image[img["id"]], np.float32).reshape(-1, 5),
        )
        for img in coco["images"]
    ]
    return samples, coco


class ImageCache:
    """Decoded BGR images kept in memory (4000 synthetic images are ~2 GB)."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples
        self.images: dict[int, np.ndarray] = {}

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = self.images.get(index)
        if image is None:
            image = cv2.imread(str(self.samples[index].path), cv2.IMREAD_COLOR)
            if image is None:
                raise FileNotFoundError(self.samples[index].path)
            self.images[index] = image
        return image, self.samples[index].boxes


def letterbox_uint8(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """The inference letterbox (models.yolox.preprocess.Letterbox) on uint8 pixels."""
    h, w = image.shape[:2]
    ratio = min(size / h, size / w)
    nh, nw = max(1, min(size, int(h * ratio))), max(1, min(size, int(w * ratio)))
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    canvas[:nh, :nw] = (
        image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    )
    return canvas, ratio


def mosaic(cache: ImageCache, index: int, size: int, n_images: int, args: Any) -> tuple:
    """YOLOX mosaic: four letterboxed images around a random centre on a 2x canvas, then
    a random affine (scale, small rotation and shear, translation) back to size x size."""
    from yolox.data.data_augment import random_affine

    xc = int(random.uniform(0.5 * size, 1.5 * size))
    yc = int(random.uniform(0.5 * size, 1.5 * size))
    canvas = np.full((2 * size, 2 * size, 3), PAD_VALUE, np.uint8)
    indices = [index] + [random.randrange(n_images) for _ in range(3)]
    all_labels = []
    for k, idx in enumerate(indices):
        image, boxes = cache.get(idx)
        h0, w0 = image.shape[:2]
        scale = min(size / h0, size / w0)
        image = cv2.resize(
            image, (int(w0 * scale), int(h0 * scale)), interpolation=cv2.INTER_LINEAR
        )
        h, w = image.shape[:2]
        if k == 0:
            x1, y1, x2, y2 = max(xc - w, 0), max(yc - h, 0), xc, yc
            sx1, sy1, sx2, sy2 = w - (x2 - x1), h - (y2 - y1), w, h
        elif k == 1:
            x1, y1, x2, y2 = xc, max(yc - h, 0), min(xc + w, 2 * size), yc
            sx1, sy1, sx2, sy2 = 0, h - (y2 - y1), min(w, x2 - x1), h
        elif k == 2:
            x1, y1, x2, y2 = max(xc - w, 0), yc, xc, min(2 * size, yc + h)
            sx1, sy1, sx2, sy2 = w - (x2 - x1), 0, w, min(y2 - y1, h)
        else:
            x1, y1, x2, y2 = xc, yc, min(xc + w, 2 * size), min(2 * size, yc + h)
            sx1, sy1, sx2, sy2 = 0, 0, min(w, x2 - x1), min(y2 - y1, h)
        canvas[y1:y2, x1:x2] = image[sy1:sy2, sx1:sx2]
        labels = boxes.copy()
        if len(labels):
            labels[:, [0, 2]] = scale * boxes[:, [0, 2]] + (x1 - sx1)
            labels[:, [1, 3]] = scale * boxes[:, [1, 3]] + (y1 - sy1)
        all_labels.append(labels)
    labels = np.concatenate(all_labels, 0)
    np.clip(labels[:, :4], 0, 2 * size, out=labels[:, :4])
    image, labels = random_affine(
        canvas,
        labels,
        target_size=(size, size),
        degrees=args.degrees,
        translate=args.translate,
        scales=tuple(args.mosaic_scale),
        shear=args.shear,
    )
    return image, labels


def single(cache: ImageCache, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image letterboxed exactly as at inference."""
    image, boxes = cache.get(index)
    image, ratio = letterbox_uint8(image, size)
    labels = boxes.copy()
    labels[:, :4] *= ratio
    return image, labels


def finish(image: np.ndarray, labels: np.ndarray, hsv: bool) -> tuple[np.ndarray, np.ndarray]:
    """HSV jitter and horizontal flip (YOLOX TrainTransform); labels -> padded
    (class, cx, cy, w, h) rows, boxes under 2 px on a side dropped."""
    from yolox.data.data_augment import augment_hsv

    image = np.ascontiguousarray(image)
    if hsv:
        augment_hsv(image)
    boxes = labels[:, :4].astype(np.float32)
    if random.random() < 0.5:
        image = np.ascontiguousarray(image[:, ::-1])
        width = image.shape[1]
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    keep = np.minimum(wh[:, 0], wh[:, 1]) >= 2
    rows = np.zeros((MAX_LABELS, 5), np.float32)
    kept = np.concatenate(
        [labels[keep, 4:5], (boxes[keep, :2] + boxes[keep, 2:]) / 2, wh[keep]], axis=1
    )[:MAX_LABELS]
    rows[: len(kept)] = kept
    return image, rows


def make_batch(
    cache: ImageCache, batch: int, size: int, use_mosaic: bool, args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.empty((batch, size, size, 3), np.uint8)
    targets = np.zeros((batch, MAX_LABELS, 5), np.float32)
    n = len(cache.samples)
    for b in range(batch):
        index = random.randrange(n)
        if use_mosaic and random.random() < args.mosaic_prob:
            image, labels = mosaic(cache, index, size, n, args)
        else:
            image, labels = single(cache, index, size)
        images[b], targets[b] = finish(image, labels, hsv=True)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous()
    return tensor, torch.from_numpy(targets)


# --------------------------------------------------------------------------- training


class ModelEMA:
    """YOLOX's ModelEMA (yolox/utils/ema.py): decay ramps up as d * (1 - exp(-n / ramp))."""

    def __init__(self, model: nn.Module, decay: float, ramp: float, updates: int = 0) -> None:
        self.ema = copy.deepcopy(model).eval()
        self.decay_max, self.ramp, self.updates = decay, ramp, updates
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def update(self, model: nn.Module) -> None:
        with torch.no_grad():
            self.updates += 1
            d = self.decay_max * (1 - math.exp(-self.updates / self.ramp))
            msd = model.state_dict()
            for k, v in self.ema.state_dict().items():
                if v.dtype.is_floating_point:
                    v.mul_(d).add_(msd[k].detach(), alpha=1 - d)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """YOLOX's split: decay on conv/linear weights only, none on BN and biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and not isinstance(module, nn.modules.batchnorm._BatchNorm):
                decay.append(p)
            else:
                no_decay.append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def make_optimizer(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    groups = param_groups(model, args.weight_decay)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)


def lr_at(step: int, args: Any) -> float:
    """YOLOX 'yoloxwarmcos': quadratic warm-up, cosine to min_lr, min_lr in the no-aug phase."""
    base, min_lr = args.lr, args.lr * args.min_lr_ratio
    warm = args.warmup_steps
    no_aug = no_aug_start(args)
    if step < warm:
        return base * (step / warm) ** 2
    if step >= no_aug:
        return min_lr
    t = (step - warm) / max(1, no_aug - warm)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t))


def no_aug_start(args: Any) -> int:
    return round(args.steps * (1 - args.no_aug_frac))


def pick_size(step: int, args: Any) -> int:
    """Multi-scale as YOLOX (a new size every `size_every` steps), reproducible per step."""
    if not args.sizes_multi:
        return args.size
    rng = random.Random(args.seed * 1_000_003 + step // args.size_every)
    return rng.choice(args.sizes_multi)


# --------------------------------------------------------------------------- evaluation


def quick_map(model: nn.Module, samples: list[Sample], coco: dict[str, Any], limit: int) -> float:
    """mAP@.5 of `model` (eval mode) on the first `limit` val images, pycocotools, through
    the project's letterbox and post-processing (conf 0.001, NMS 0.45) at 416."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    head: Any = model.head
    was_decoding = head.decode_in_inference
    head.decode_in_inference = False
    letterbox = Letterbox(EVAL_SIZE, EVAL_SIZE, "nchw", np.float32)
    images = coco["images"][:limit]
    results = []
    with torch.no_grad():
        for img, sample in zip(images, samples):
            bgr = cv2.imread(str(sample.path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise FileNotFoundError(sample.path)
            ratio = letterbox(bgr)
            raw = model(torch.from_numpy(letterbox.input)).numpy()
            det = postprocess(raw, (EVAL_SIZE, EVAL_SIZE), ratio, bgr.shape[:2], conf=0.001)
            for box, score, cid in zip(det.boxes.tolist(), det.scores.tolist(), det.class_ids):
                x1, y1, x2, y2 = box
                results.append(
                    {
                        "image_id": img["id"],
                        "category_id": int(cid) + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": score,
                    }
                )
    head.decode_in_inference = was_decoding
    ids = {img["id"] for img in images}
    subset = dict(
        coco, images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids]
    )
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = subset
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


# --------------------------------------------------------------------------- checkpoints


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/synth"))
    p.add_argument("--out", type=Path, default=Path("runs/yolox_nano"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=320, help="training input size (single scale)")
    p.add_argument(
        "--sizes-multi",
        type=lambda s: [int(v) for v in s.split(",")] if s else [],
        default=[],
        help="comma-separated sizes for multi-scale (multiples of 32); empty: --size only",
    )
    p.add_argument("--size-every", type=int, default=10, help="steps between size changes")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=0.01, help="peak LR for the whole batch")
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-aug-frac", type=float, default=0.15, help="last part: no mosaic, L1")
    p.add_argument("--mosaic-prob", type=float, default=1.0)
    p.add_argument("--mosaic-scale", type=float, nargs=2, default=[0.5, 1.5])
    p.add_argument("--degrees", type=float, default=10.0)
    p.add_argument("--translate", type=float, default=0.1)
    p.add_argument("--shear", type=float, default=2.0)
    p.add_argument("--ema-decay", type=float, default=0.9998)
    p.add_argument("--ema-ramp", type=float, default=2000.0, help="EMA warm-up in updates")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--ckpt-every-s", type=float, default=240.0)
    p.add_argument("--eval-every-s", type=float, default=900.0)
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bf16",
        action="store_true",
        help="convolutions in bfloat16 (CPU autocast; ~1.3-1.5x faster where the CPU has "
        "AMX or AVX-512 BF16), box decoding and losses in float32",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument(
        "--init",
        type=Path,
        help="start from the weights (raw and EMA) of another run's last.pt, or of an fp32 "
        "ONNX file or package folder that build_yolox exported (BatchNorms re-split from "
        "64 training images), with a fresh optimizer and LR schedule (a warm restart)",
    )
    p.add_argument("--bench", type=int, default=0, help="time N steps per size and exit")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def _to_float(_module: nn.Module, _inputs: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.float()
    return tuple(t.float() for t in output)


def use_bf16_convs(model: nn.Module) -> None:
    """Make the convolutions run in bfloat16 under CPU autocast (AMX/AVX-512 where the CPU
    has them) while everything after them stays float32: the backbone's features and the
    head's prediction convs are cast back, so box decoding, SimOTA and the losses see float32
    (bfloat16 has 8 bits of mantissa: a coordinate near 400 px would round to 2 px)."""
    head: Any = model.head
    backbone: Any = model.backbone
    backbone.register_forward_hook(_to_float)
    for convs in (head.cls_preds, head.reg_preds, head.obj_preds):
        for conv in convs:
            conv.register_forward_hook(_to_float)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    lr: float,
    bf16: bool = False,
) -> dict[str, float]:
    for group in optimizer.param_groups:
        group["lr"] = lr
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(images, targets)
    optimizer.zero_grad(set_to_none=True)
    out["total_loss"].backward()
    optimizer.step()
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}


def bench(args: argparse.Namespace, cache: ImageCache) -> None:
    sizes = args.sizes_multi or [args.size]
    for size in sizes:
        torch.manual_seed(args.seed)
        model = new_model(args)
        optimizer = make_optimizer(model, args)
        times, data_times = [], []
        for step in range(args.bench + 2):
            t0 = time.perf_counter()
            images, targets = make_batch(cache, args.batch, size, True, args)
            t1 = time.perf_counter()
            parts = train_step(model, optimizer, images, targets, args.lr * 0.1, args.bf16)
            if step >= 2:
                times.append(time.perf_counter() - t0)
                data_times.append(t1 - t0)
        log(
            f"bench size {size} batch {args.batch} {args.optimizer}"
            f"{' bf16' if args.bf16 else ''}: "
            f"{np.median(times):.3f} s/step (data {np.median(data_times):.3f}), "
            f"loss {parts['total_loss']:.2f}"
        )


def onnx_init_path(path: Path) -> Path | None:
    """The ONNX file `--init` names (a .onnx file or a package folder), or None for a .pt."""
    if path.is_dir():
        if not (path / "model.onnx").is_file():
            raise SystemExit(f"--init {path}: a folder without model.onnx")
        return path / "model.onnx"
    return path if path.suffix == ".onnx" else None


def new_model(args: argparse.Namespace) -> nn.Module:
    """YOLOX-Nano for 6 classes in channels-last layout (faster convs on CPU)."""
    model = build_nano(6).to(memory_format=torch.channels_last)  # type: ignore[call-overload, unused-ignore]
    if args.bf16:
        use_bf16_convs(model)
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    cv2.setNumThreads(1)

    train_samples, _ = load_split(args.data, "train")
    val_samples, val_coco = load_split(args.data, "val")
    cache = ImageCache(train_samples)
    if args.bench:
        bench(args, cache)
        return 0

    model = new_model(args)
    optimizer = make_optimizer(model, args)
    ema = ModelEMA(model, args.ema_decay, args.ema_ramp)
    step, best, history = 0, -1.0, []
    last_path, best_path = args.out / "last.pt", args.out / "best.pt"
    if args.resume:
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["raw_model"])
        ema.ema.load_state_dict(ckpt["model"])
        ema.updates = ckpt["ema_updates"]
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best, history = ckpt["step"], ckpt["best_map50"], ckpt["history"]
        set_rng_state(ckpt["rng"])
        log(f"resumed from {last_path} at step {step} (best mAP@.5 {best:.4f})")
    else:
        log(f"args: {vars(args)}")
        onnx_path = onnx_init_path(args.init) if args.init is not None else None
        if onnx_path is not None:
            images, _ = make_batch(cache, 64, EVAL_SIZE, True, args)
            state = state_from_onnx(onnx_path, images.float(), 6)
            model.load_state_dict(state)
            ema.ema.load_state_dict(state)
            ema.updates = int(10 * args.ema_ramp)  # the EMA keeps its full decay
            log(f"weights from {onnx_path} (BatchNorms re-split); new schedule")
        elif args.init is not None:
            ckpt = torch.load(args.init, map_location="cpu", weights_only=False)
            model.load_state_dict(ckpt["raw_model"])
            ema.ema.load_state_dict(ckpt["model"])
            ema.updates = ckpt["ema_updates"]  # the EMA keeps its full decay
            log(f"weights from {args.init} (its step {ckpt['step']}); new schedule")

    def checkpoint() -> None:
        atomic_save(
            {
                "model": ema.ema.state_dict(),
                "raw_model": model.state_dict(),
                "ema_updates": ema.updates,
                "optimizer": optimizer.state_dict(),
                "step": step,
                "best_map50": best,
                "history": history,
                "rng": rng_state(),
                "args": {k: str(v) for k, v in vars(args).items()},
                "num_classes": 6,
            },
            last_path,
        )

    def evaluate() -> None:
        nonlocal best
        t0 = time.perf_counter()
        score = quick_map(ema.ema, val_samples, val_coco, args.eval_images)
        history.append({"step": step, "map50": score})
        marker = ""
        if score > best:
            best = score
            marker = " (best)"
            atomic_save(
                {"model": ema.ema.state_dict(), "step": step, "map50": score, "num_classes": 6},
                best_path,
            )
        log(
            f"eval step {step}: EMA mAP@.5 {score:.4f} on {args.eval_images} val images at "
            f"{EVAL_SIZE}{marker} ({time.perf_counter() - t0:.0f} s)"
        )

    no_aug = no_aug_start(args)
    last_ckpt = last_eval = time.monotonic()
    window: list[float] = []
    sums: dict[str, float] = {}
    count = 0
    model.train()
    head: Any = model.head
    while step < args.steps:
        late = step >= no_aug
        head.use_l1 = late
        size = pick_size(step, args) if not late else EVAL_SIZE if args.sizes_multi else args.size
        t0 = time.perf_counter()
        images, targets = make_batch(cache, args.batch, size, not late, args)
        lr = lr_at(step, args)
        parts = train_step(model, optimizer, images, targets, lr, args.bf16)
        if not math.isfinite(parts["total_loss"]):
            raise RuntimeError(f"loss is {parts['total_loss']} at step {step}")
        ema.update(model)
        step += 1
        window.append(time.perf_counter() - t0)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        if step % args.log_every == 0 or step == args.steps:
            n = count
            per = float(np.mean(window[-100:]))
            eta = (args.steps - step) * per
            avg = {k: v / n for k, v in sums.items()}
            log(
                f"step {step}/{args.steps} size {size} loss {avg['total_loss']:.3f} "
                f"(iou {avg['iou_loss']:.3f} obj {avg['conf_loss']:.3f} cls {avg['cls_loss']:.3f} "
                f"l1 {avg['l1_loss']:.3f} fg {avg['num_fg']:.2f}) lr {lr:.5f} "
                f"{per:.2f} s/step ETA {eta / 60:.1f} min" + (" [no mosaic, L1]" if late else "")
            )
            window, sums, count = window[-100:], {}, 0
        now = time.monotonic()
        if now - last_eval >= args.eval_every_s and step < args.steps:
            evaluate()
            last_eval = time.monotonic()
        if now - last_ckpt >= args.ckpt_every_s:
            checkpoint()
            last_ckpt = time.monotonic()
    evaluate()
    checkpoint()
    log(f"done: {step} steps, best EMA mAP@.5 {best:.4f}; history {history}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
