"""Run the model over uint8 images on one device, fast: the predictor actor's engine.

``ModelRunner.run(pixels)`` takes a batch of uint8 NHWC images (a numpy array, or a tensor
already on the device when the actor decoded them there) and returns the model's (N, 136)
outputs as float32 numpy. It:

- runs the model in the job's precision (``pipeline.model.precision``): bf16 autocast for the
  backbone with the head in fp32, or fp32 (IEEE, no TF32); channels_last where it pays;
- cuts the batch into micro-batches of at most ``micro_batch`` images and pipelines them: each
  micro-batch is copied into one of two host buffers (pinned on CUDA) and sent to the device on
  a copy stream (``non_blocking``) while the previous one computes on the compute stream; the
  compute stream waits on an event for its input, and a buffer is refilled only after its last
  copy finished. Each calling thread has its own streams and buffers, so an actor that runs two
  calls at once (``max_concurrent_calls_per_actor=2``) also overlaps one call's host work with
  the other's GPU work. On the CPU the same code runs with no streams (every step is
  synchronous), so the CPU tests run the pipelined path and its out-of-memory handling;
- optionally compiles the model (``torch.compile``, shapes fixed: every micro-batch is padded to
  ``micro_batch`` rows so nothing recompiles), warmed up once at start. A compiled model is not
  thread-safe (pytorch/pytorch#105943, #118260): its calls are serialised by a lock, so two
  threads still overlap their copies, decoding and host work, but not the compiled call;
- on out-of-memory at the copy to the device or in the forward pass halves the micro-batch and
  retries those rows (down to 1), so a too large ``--batch-size`` costs speed, not the run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import numpy as np

from pipeline.model.network import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE

log = logging.getLogger("pipeline")


class ModelRunner:
    def __init__(self, model, device, micro_batch: int = 64, compile: bool = False,
                 compile_backend: str = "inductor", precision: str = "auto"):
        import torch

        from pipeline.model.precision import channels_last, resolve_precision, use_ieee_fp32

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = channels_last(self.device, self.precision)
        use_ieee_fp32()
        self.micro_batch = max(1, int(micro_batch))
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.compiled = bool(compile)
        self._forward = self.model
        self._local = threading.local()
        self._lock = threading.Lock()  # the micro-batch size, lowered by any thread
        # One compiled call at a time (see the module docstring); eager calls run concurrently.
        self._forward_lock = threading.Lock() if self.compiled else contextlib.nullcontext()
        if self.compiled:
            started = time.time()
            self._forward = torch.compile(self.model, backend=compile_backend, dynamic=False)
            # Compile now, not on the first real batch.
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
        if not isinstance(pixels, torch.Tensor):
            return self._run_pipelined(np.asarray(pixels))
        if not self.cuda:
            return self._run_in_turn(pixels).numpy()
        # Already on the GPU (decoded there): run on this thread's compute stream, after the
        # work that made the tensor.
        compute = self._thread_state().compute
        compute.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(compute):
            out = self._run_in_turn(pixels)
        compute.synchronize()
        return out.numpy()

    def stream(self):
        """Context manager: this thread's compute stream on CUDA (decode there, then ``run``);
        nothing on the CPU."""
        import torch

        if not self.cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._thread_state().compute)

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

        from pipeline.model.precision import autocast

        n = x.shape[0]
        if self.compiled and n < self.micro_batch:  # one shape for the compiled graph
            pad = torch.zeros((self.micro_batch - n, *x.shape[1:]), dtype=x.dtype,
                              device=x.device)
            x = torch.cat([x, pad])
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision), self._forward_lock:
            out = self._forward(x)
        return out[:n].float()

    def _guard_oom(self, fn, *args):
        """``fn(*args)``; on out-of-memory lower the micro-batch and raise ``_Retry``."""
        import torch

        try:
            return fn(*args)
        except torch.OutOfMemoryError:
            size = len(args[0])
            if size == 1 or self.compiled:  # a compiled graph has one fixed batch shape
                raise
            with self._lock:
                self.micro_batch = min(self.micro_batch, max(1, size // 2))
            if self.cuda:
                torch.cuda.empty_cache()
            log.warning("out of memory on %d images (%s): micro-batch lowered to %d", size,
                        _STEPS.get(getattr(fn, "__name__", ""), "the model"), self.micro_batch)
            raise _Retry from None

    def _thread_state(self) -> _ThreadState:
        """Per calling thread: its streams (CUDA), two host buffers and their copy events."""
        import torch

        state = getattr(self._local, "state", None)
        if state is None:  # the micro-batch only ever shrinks: the buffers stay big enough
            shape = (self.micro_batch, INPUT_SIZE, INPUT_SIZE, 3)
            state = _ThreadState(
                buffers=[torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda)
                         for _ in range(2)])
            if self.cuda:
                state.copy = torch.cuda.Stream(self.device)
                state.compute = torch.cuda.Stream(self.device)
            self._local.state = state
        return state

    def _to_device(self, host, state: _ThreadState, slot: int):
        """Send a filled host buffer to the device on the copy stream; the compute stream waits
        for it. On the CPU the buffer is the input itself (the compute reads it before the
        buffer is refilled: every step is synchronous there)."""
        import torch

        if not self.cuda:
            return host
        with torch.cuda.stream(state.copy):
            x = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(state.copy)
        state.copied[slot] = copied
        state.compute.wait_event(copied)
        x.record_stream(state.compute)
        return x

    def _run_pipelined(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        n, outs, start, turn = len(pixels), [], 0, 0
        state = self._thread_state()
        while start < n:
            size = min(self.micro_batch, n - start)
            slot = turn % 2
            if state.copied[slot] is not None:
                state.copied[slot].synchronize()  # the buffer's previous copy is done
            host = state.buffers[slot][:size]
            host.numpy()[...] = pixels[start:start + size]
            try:
                x = self._guard_oom(self._to_device, host, state, slot)
                with self._on(state.compute):
                    outs.append(self._guard_oom(self._chunk, x))
            except _Retry:
                continue  # the same rows again with the smaller micro-batch
            start += size
            turn += 1
        if state.compute is not None:
            state.compute.synchronize()
        return torch.cat(outs).cpu().numpy()

    @staticmethod
    def _on(stream):
        import torch

        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


_STEPS = {"_to_device": "the copy to the device", "_chunk": "the forward pass"}


class _ThreadState:
    """One calling thread's streams (None on the CPU), host buffers and last copy events."""

    def __init__(self, buffers):
        self.buffers = buffers
        self.copied = [None, None]
        self.copy = None
        self.compute = None


class _Retry(Exception):
    """Internal: the micro-batch was lowered after an out-of-memory error; redo the rows."""
