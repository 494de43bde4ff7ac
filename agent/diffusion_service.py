"""The `diffusion` extension: the `diffusion.generate` command on a low-priority worker thread.

Arguments are checked on the command thread; a bounded queue feeds one worker (niced, few ORT
threads) that sends progress, then the image (chunked when large) through `router.send`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import math
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from agent.commands import DEFERRED, CommandError, Deferred, Request
from agent.config import DiffusionConfig
from models.diffusion.conditions import CONDITIONS, condition_map, decode_image
from models.diffusion.layout import read_layout
from models.diffusion.pipeline import Cancelled, DiffusionPipeline, GenerateRequest, StepInfo
from models.diffusion.schedulers import SCHEDULERS
from runtimes.base import RuntimeOptions
from runtimes.errors import EdgeAgentError, InputError

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger(__name__)

COMMAND = "diffusion.generate"
LOAD_TIMEOUT_S = 120.0
MAX_PROMPT_CHARS = 500
FORMATS = ("png", "jpeg")


@dataclass
class Job:
    """One checked request, waiting for the worker."""

    request: Request
    generate: GenerateRequest
    camera: str | None = None
    image: np.ndarray | None = None  # uploaded condition image (BGR)
    condition_type: str = "canny"
    image_format: str = "png"
    quality: int = 90
    queued_at: float = field(default_factory=time.monotonic)


def _int(args: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CommandError("bad_args", f"{key} must be an integer {lo}..{hi}, got {value!r}")
    return value


def _float(args: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CommandError("bad_args", f"{key} must be a number {lo}..{hi}, got {value!r}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise CommandError("bad_args", f"{key} must be a number {lo}..{hi}, got {value!r}")
    return float(value)


def _str(args: dict[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = args.get(key, default)
    if value not in choices:
        raise CommandError("bad_args", f"{key} must be one of {list(choices)}, got {value!r}")
    return str(value)


class DiffusionService:
    """Owns the pipeline, the request queue and the worker thread."""

    name = "diffusion"

    def __init__(self, agent: Agent, config: DiffusionConfig) -> None:
        self.agent = agent
        self.config = config
        self.layout = read_layout(config.model)  # a missing component fails the agent's start
        self.pipeline: DiffusionPipeline | None = None
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=config.queue_depth)
        self._stop = threading.Event()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.state = "loading"
        self.thread_nice: int | None = None
        self.running = False
        self.generated = self.failed = 0
        self.last: dict[str, Any] = {}
        self._idle_sample: tuple[float, dict[str, int]] | None = None
        self.idle_fps: dict[str, float] = {}
        params = self.layout.params
        self.default_steps = int(params.get("default_steps", 20))
        self.default_guidance = float(params.get("default_guidance", 7.5))
        self.default_scheduler = str(params.get("default_scheduler", "ddim"))
        adapter = params.get("adapter")
        self.default_condition = (
            str(adapter.get("condition", "canny")) if isinstance(adapter, dict) else "canny"
        )
        agent.commands.register(COMMAND, self.handle)

    # --- extension protocol ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="diffusion", daemon=True)
        self._thread.start()
        if not self._loaded.wait(LOAD_TIMEOUT_S):
            raise EdgeAgentError(f"diffusion: {self.layout.root} did not load in time")
        if self._load_error is not None:
            raise self._load_error

    def stop(self, timeout: float) -> bool:
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def reported(self) -> dict[str, Any]:
        pipe = self.pipeline
        return {
            "model": self.layout.name,
            "state": self.state,
            "schedulers": sorted(SCHEDULERS),
            "adapter": bool(pipe and pipe.has_adapter),
            "conditions": sorted(CONDITIONS),
            "size_multiple": pipe.size_multiple if pipe else None,
            "default_size": list(pipe.default_size) if pipe else None,
            "max_size": self.config.max_size,
            "max_steps": self.config.max_steps,
        }

    def telemetry(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "queued": self._queue.qsize(),
            "running": self.running,
            "generated": self.generated,
            "failed": self.failed,
            "thread_nice": self.thread_nice,
            "detection_fps_idle": self.idle_fps,
            "last": self.last,
        }

    # --- the command (on the router's thread) ---------------------------------------------

    def handle(self, request: Request) -> Deferred:
        pipe = self.pipeline
        if pipe is None:
            raise CommandError("not_ready", f"diffusion pipeline is {self.state}")
        job = self.parse(request, pipe)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise CommandError(
                "busy", f"{self._queue.maxsize} diffusion request(s) already waiting"
            ) from None
        self._send(request, {"status": "queued", "position": self._queue.qsize()})
        return DEFERRED

    def parse(self, request: Request, pipe: DiffusionPipeline) -> Job:
        """Check every argument; CommandError("bad_args", ...) names the first bad one."""
        args = request.args
        known = {
            "prompt", "negative_prompt", "steps", "seed", "guidance", "size", "width", "height",
            "scheduler", "condition", "condition_type", "adapter_weight", "format", "quality",
        }  # fmt: skip
        unknown = sorted(set(args) - known)
        if unknown:
            raise CommandError("bad_args", f"unknown argument(s) {unknown}; known: {sorted(known)}")
        prompt = args.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
            raise CommandError("bad_args", f"prompt must be text of 1..{MAX_PROMPT_CHARS} chars")
        negative = args.get("negative_prompt", "")
        if not isinstance(negative, str) or len(negative) > MAX_PROMPT_CHARS:
            raise CommandError("bad_args", "negative_prompt must be text")
        steps = _int(args, "steps", self.default_steps, 1, self.config.max_steps)
        seed = _int(args, "seed", secrets.randbelow(2**31), 0, 2**63 - 1)
        guidance = _float(args, "guidance", self.default_guidance, 0.0, 50.0)
        scheduler = _str(args, "scheduler", self.default_scheduler, tuple(sorted(SCHEDULERS)))
        width, height = self._size(args, pipe)
        if scheduler == "lcm" and steps > 50:
            raise CommandError("bad_args", "lcm takes at most 50 steps")
        job = Job(
            request,
            GenerateRequest(
                prompt,
                negative,
                steps,
                seed,
                guidance,
                width,
                height,
                scheduler,
                adapter_weight=_float(args, "adapter_weight", 1.0, 0.0, 5.0),
            ),
            image_format=_str(args, "format", "png", FORMATS),
            quality=_int(args, "quality", 90, 10, 100),
            condition_type=_str(
                args, "condition_type", self.default_condition, tuple(sorted(CONDITIONS))
            ),
        )
        condition = args.get("condition")
        if condition is None:
            return job
        if not pipe.has_adapter:
            raise CommandError("bad_args", f"{pipe.name} has no adapter: condition cannot be used")
        if isinstance(condition, str) and condition.startswith("camera:"):
            name = condition[len("camera:") :]
            if name not in self.agent.pipelines:
                raise CommandError(
                    "bad_args",
                    f"unknown pipeline {name!r} in condition; "
                    f"known: {sorted(self.agent.pipelines)}",
                )
            job.camera = name
        elif isinstance(condition, dict) and set(condition) == {"image_b64"}:
            data = condition["image_b64"]
            try:
                raw = base64.b64decode(data if isinstance(data, str) else "", validate=True)
                job.image = decode_image(raw)
            except (binascii.Error, ValueError, InputError) as exc:
                raise CommandError("bad_args", f"condition.image_b64: {exc}") from None
        else:
            raise CommandError(
                "bad_args", 'condition must be "camera:<pipeline>" or {"image_b64": "<base64>"}'
            )
        return job

    def _size(self, args: dict[str, Any], pipe: DiffusionPipeline) -> tuple[int, int]:
        size = args.get("size")
        if size is not None and ("width" in args or "height" in args):
            raise CommandError("bad_args", "give size or width/height, not both")
        if isinstance(size, int) and not isinstance(size, bool):
            width = height = size
        elif isinstance(size, list) and len(size) == 2:
            width, height = size
        elif size is None:
            width = args.get("width", pipe.default_size[0])
            height = args.get("height", pipe.default_size[1])
        else:
            raise CommandError(
                "bad_args", f"size must be an integer or [width, height], got {size!r}"
            )
        m, most = pipe.size_multiple, self.config.max_size
        for side, value in (("width", width), ("height", height)):
            bad = isinstance(value, bool) or not isinstance(value, int)
            if bad or not m <= value <= most or value % m:
                raise CommandError(
                    "bad_args", f"{side} must be a multiple of {m} in {m}..{most}, got {value!r}"
                )
        return int(width), int(height)

    # --- the worker -----------------------------------------------------------------------

    def _lower_priority(self) -> None:
        tid = threading.get_native_id()
        try:
            before = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(before + self.config.nice, 19))
            self.thread_nice = os.getpriority(os.PRIO_PROCESS, tid)
        except (OSError, AttributeError) as exc:  # not Linux, or not allowed
            log.warning("diffusion: cannot lower the thread's priority: %s", exc)

    def _run(self) -> None:
        self._lower_priority()  # before the sessions exist: ORT's threads inherit it
        try:
            providers = tuple(self.config.providers) if self.config.providers else None
            options = RuntimeOptions(threads=self.config.threads, providers=providers)
            self.pipeline = DiffusionPipeline(self.layout, options)
            self.state = "ready"
        except BaseException as exc:
            self._load_error = exc
            self.state = "error"
            return
        finally:
            self._loaded.set()
        try:
            while not (self._stop.is_set() or self.agent.stop_event.is_set()):
                try:
                    job = self._queue.get(timeout=0.5)
                except queue.Empty:
                    self._sample_idle()
                    continue
                self._run_job(job)
                self._idle_sample = None
        finally:
            self.pipeline.close()

    def _frames(self) -> dict[str, int]:
        return {name: pipe.frames for name, pipe in self.agent.pipelines.items()}

    def _sample_idle(self) -> None:
        now, frames = time.monotonic(), self._frames()
        if self._idle_sample is not None:
            then, before = self._idle_sample
            if now - then >= 2.0:
                self.idle_fps = {
                    n: round((frames[n] - before.get(n, 0)) / (now - then), 2) for n in frames
                }
                self._idle_sample = (now, frames)
            return
        self._idle_sample = (now, frames)

    def _send(self, request: Request, body: dict[str, Any]) -> None:
        self.agent.commands.send(request, {"ok": True, "command": COMMAND, **body})

    def _fail(self, job: Job, code: str, message: str) -> None:
        self.failed += 1
        self.agent.commands.send(
            job.request,
            {"ok": False, "command": COMMAND, "error": {"code": code, "message": message}},
        )

    def _condition(self, job: Job) -> np.ndarray | None:
        image = job.image
        if job.camera is not None:
            frame = self.agent.pipelines[job.camera].camera.newest()
            if frame is None:
                raise CommandError("no_frame", f"pipeline {job.camera} has no frame yet")
            image = frame.image
        if image is None:
            return None
        req = job.generate
        return condition_map(job.condition_type, image, req.width, req.height)

    def _run_job(self, job: Job) -> None:
        assert self.pipeline is not None
        pipe, req = self.pipeline, job.generate
        started, frames0 = time.monotonic(), self._frames()
        self.running = True
        try:
            condition = self._condition(job)
            generate = GenerateRequest(**{**req.__dict__, "condition": condition})

            def progress(step: StepInfo) -> None:
                if self._stop.is_set() or self.agent.stop_event.is_set():
                    raise Cancelled("the agent is stopping")
                done = step.index + 1
                if done % self.config.progress_every == 0 or done == step.steps:
                    self._send(
                        job.request,
                        {"status": "progress", "step": done, "steps": step.steps,
                         "step_ms": round(step.step_s * 1e3, 2)},
                    )  # fmt: skip

            result = pipe.generate(generate, progress)
        except CommandError as exc:
            self._fail(job, exc.code, str(exc))
            return
        except Cancelled as exc:
            self._fail(job, "cancelled", str(exc))
            return
        except EdgeAgentError as exc:
            self._fail(job, "failed", str(exc))
            return
        except Exception as exc:  # a bug must not take the worker down
            log.exception("diffusion job crashed")
            self._fail(job, "internal", f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.running = False
        elapsed = time.monotonic() - started
        frames1 = self._frames()
        during = {n: round((frames1[n] - frames0.get(n, 0)) / elapsed, 2) for n in frames1}
        self._deliver(job, result.image, result.timings, elapsed, during)

    def _deliver(
        self,
        job: Job,
        image: np.ndarray,
        timings: dict[str, Any],
        elapsed: float,
        during: dict[str, float],
    ) -> None:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if job.image_format == "png":
            ok, buf = cv2.imencode(".png", bgr)
        else:
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, job.quality])
        if not ok:
            self._fail(job, "encode_failed", f"{job.image_format} encoding failed")
            return
        data = buf.tobytes()
        digest = hashlib.sha256(data).hexdigest()
        req = job.generate
        steps = timings["step_s"]
        self.generated += 1
        self.last = {
            "steps": req.steps,
            "ms_per_step": round(1e3 * sum(steps) / max(len(steps), 1), 2),
            "elapsed_s": round(elapsed, 3),
            "detection_fps_during": during,
            "detection_fps_idle": dict(self.idle_fps),
        }
        result: dict[str, Any] = {
            "format": job.image_format,
            "width": req.width,
            "height": req.height,
            "seed": req.seed,
            "steps": req.steps,
            "scheduler": req.scheduler,
            "guidance": req.guidance,
            "conditioned": job.camera or ("image" if job.image is not None else None),
            "bytes": len(data),
            "sha256": digest,
            "model": self.layout.name,
            **self.last,
        }
        size = self.config.chunk_bytes
        if len(data) <= size:
            result["image_b64"] = base64.b64encode(data).decode()
        else:
            total = (len(data) + size - 1) // size
            for index in range(total):
                piece = data[index * size : (index + 1) * size]
                self._send(
                    job.request,
                    {"status": "chunk",
                     "chunk": {"index": index, "total": total, "sha256": digest,
                               "data_b64": base64.b64encode(piece).decode()}},
                )  # fmt: skip
            result["chunks"] = total
        self._send(job.request, {"status": "done", "result": result})


def create(agent: Agent) -> DiffusionService | None:
    """The extension factory: None when the config has no [diffusion] section."""
    config = agent.config.diffusion
    if config is None:
        return None
    return DiffusionService(agent, config)
