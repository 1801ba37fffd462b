"""Run the model over uint8 images on one device, fast: the predictor actor's engine.

``ModelRunner.run(pixels)`` takes a batch of uint8 NHWC images (a numpy array, or a tensor
already on the device when the actor decoded them there) and returns the model's (N, 136)
outputs as float32 numpy. On CUDA it:

- runs the model in bf16 autocast with channels_last weights and inputs (fp32 on CPU, so CPU
  results match a plain forward pass);
- cuts the batch into micro-batches of at most ``micro_batch`` images and pipelines them: each
  micro-batch is copied into one of two pinned host buffers and sent to the GPU on a copy
  stream (``non_blocking``) while the previous one computes on the compute stream; the compute
  stream waits on an event for its input, and a buffer is refilled only after its last copy
  finished. Each calling thread has its own streams and buffers, so an actor that runs two calls
  at once (``max_concurrent_calls_per_actor=2``) also overlaps one call's host work with the
  other's GPU work;
- optionally compiles the model (``torch.compile``, shapes fixed: every micro-batch is padded to
  ``micro_batch`` rows so nothing recompiles), warmed up once at start;
- on CUDA out-of-memory halves the micro-batch and retries that micro-batch (down to 1), so a too
  large ``--batch-size`` costs speed, not the run.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from pipeline.model.network import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE

log = logging.getLogger("pipeline")

class ModelRunner:
    def __init__(self, model, device, micro_batch: int = 64, compile: bool = False,
                 compile_backend: str = "inductor"):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.micro_batch = max(1, int(micro_batch))
        self.model = model.to(self.device).eval()
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.compiled = bool(compile)
        self._forward = self.model
        self._local = threading.local()
        self._lock = threading.Lock()
        if self.compiled:
            started = time.time()
            self._forward = torch.compile(self.model, backend=compile_backend, dynamic=False)
            # Compile now, not on the first real batch (and not in two threads at once).
            self._chunk(torch.zeros((self.micro_batch, INPUT_SIZE, INPUT_SIZE, 3),
                                    dtype=torch.uint8, device=self.device))
            log.info("model compiled (%s) for batches of %d in %.1f s", compile_backend,
                     self.micro_batch, time.time() - started)

    # -- public -------------------------------------------------------------------------------

    def run(self, pixels) -> np.ndarray:
        """uint8 NHWC images -> (N, 136) float32 outputs in [0, 1]."""
        import torch

        n = len(pixels)
        if n == 0:
            return np.zeros((0, 136), np.float32)
        if not self.cuda:
            if not isinstance(pixels, torch.Tensor):  # (a read-only array, e.g. PIL's: copied)
                pixels = torch.from_numpy(np.require(pixels, requirements=["C", "W"]))
            return self._run_in_turn(pixels).numpy()
        if not isinstance(pixels, torch.Tensor):
            return self._run_pipelined(np.ascontiguousarray(pixels))
        # Already on the GPU (decoded there): run on this thread's compute stream, after the
        # work that made the tensor.
        compute = self._thread_state()["compute"]
        compute.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(compute):
            out = self._run_in_turn(pixels)
        compute.synchronize()
        return out.numpy()

    def stream(self):
        """Context manager: this thread's compute stream on CUDA (decode there, then ``run``)."""
        import contextlib

        import torch

        if not self.cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._thread_state()["compute"])

    # -- internals ----------------------------------------------------------------------------

    def _run_in_turn(self, x):
        """Micro-batches one after the other on the current stream -> (N, 136) on the CPU."""
        import torch

        n, outs, start = len(x), [], 0
        while start < n:
            size = min(self.micro_batch, n - start)
            try:
                outs.append(self._guard_oom(
                    self._chunk, x[start:start + size].to(self.device, non_blocking=True)))
            except _Retry:
                continue  # the same rows again with the smaller micro-batch
            start += size
        return torch.cat(outs).cpu()

    def _chunk(self, x):
        """One micro-batch on the device: uint8 NHWC -> (n, 136) model outputs (on device)."""
        import torch

        n = x.shape[0]
        if self.compiled and n < self.micro_batch:  # one shape for the compiled graph
            pad = torch.zeros((self.micro_batch - n, *x.shape[1:]), dtype=x.dtype,
                              device=x.device)
            x = torch.cat([x, pad])
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                     enabled=self.cuda):
            out = self._forward(x)
        return out[:n].float()

    def _guard_oom(self, fn, *args):
        """``fn(*args)``; on CUDA out-of-memory lower the micro-batch and raise ``_Retry``."""
        import torch

        try:
            return fn(*args)
        except torch.cuda.OutOfMemoryError:
            size = len(args[0])
            if size == 1 or self.compiled:  # a compiled graph has one fixed batch shape
                raise
            with self._lock:
                self.micro_batch = min(self.micro_batch, max(1, size // 2))
            if self.cuda:
                torch.cuda.empty_cache()
            log.warning("CUDA out of memory on %d images: micro-batch lowered to %d", size,
                        self.micro_batch)
            raise _Retry from None

    def _thread_state(self):
        """Per calling thread: a copy stream, a compute stream, two pinned buffers + events."""
        import torch

        state = getattr(self._local, "state", None)
        if state is None:  # the micro-batch only ever shrinks: the buffers stay big enough
            shape = (self.micro_batch, INPUT_SIZE, INPUT_SIZE, 3)
            state = {
                "copy": torch.cuda.Stream(self.device),
                "compute": torch.cuda.Stream(self.device),
                "buffers": [torch.empty(shape, dtype=torch.uint8).pin_memory()
                            for _ in range(2)],
                "copied": [None, None],
            }
            self._local.state = state
        return state

    def _run_pipelined(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        n, outs, start, turn = len(pixels), [], 0, 0
        while start < n:
            state = self._thread_state()
            size = min(self.micro_batch, n - start)
            slot = turn % 2
            if state["copied"][slot] is not None:
                state["copied"][slot].synchronize()  # the buffer's previous copy is done
            host = state["buffers"][slot][:size]
            host.numpy()[...] = pixels[start:start + size]
            with torch.cuda.stream(state["copy"]):
                x = host.to(self.device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(state["copy"])
            state["copied"][slot] = copied
            state["compute"].wait_event(copied)
            x.record_stream(state["compute"])
            try:
                with torch.cuda.stream(state["compute"]):
                    outs.append(self._guard_oom(self._chunk, x))
            except _Retry:
                continue  # the same rows again with the smaller micro-batch
            start += size
            turn += 1
        state = self._thread_state()
        state["compute"].synchronize()
        return torch.cat(outs).cpu().numpy()


class _Retry(Exception):
    """Internal: the micro-batch was lowered after an out-of-memory error; redo the rows."""
