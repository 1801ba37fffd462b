"""The GPU path, run on the CPU wherever it can be: bf16 autocast with the fp32 head (inference,
training, validation), the batched device decode with its memory budget, failure bisection,
out-of-memory splits, CPU fallbacks counted per reason, the stream ordering before each decode,
the pipelined runner and its out-of-memory paths, the compiled model's lock, the planning of
GPU actors; and, on a CUDA machine, the same against the GPU.

On this AVX2-only CPU the model is ~8x slower in bf16 than in fp32, so the tests that run the real
VGG16 in bf16 use two or three images; the training tests give the real head a one-layer
backbone (the head's precision is what they check)."""

from __future__ import annotations

import io
import json
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from support.helpers import LANDMARK_TOLERANCE_PX, TOLERANCE, TinyModel, bad_table, jpeg, write_tar

from pipeline.demo.synthetic import render_face, write_sample_archive
from pipeline.inference.config import InferConfig
from pipeline.inference.job import plan, run_inference
from pipeline.io.shards import list_shards
from pipeline.model.network import build_model
from pipeline.model.precision import resolve_precision
from pipeline.stages import gpu_decode
from pipeline.stages.gpu_decode import (
    budget_parts,
    decode_budget,
    decode_crop_resize,
    probe_and_crop,
)
from pipeline.stages.preprocess import preprocess, to_pixels
from pipeline.stages.reader import ReaderSettings, ShardReader
from pipeline.stages.runner import ModelRunner

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def on_bf16_grid(outputs: np.ndarray) -> float:
    """The share of outputs >= 0.5 that are multiples of 1/256: where a bf16 sigmoid puts all
    of them (bf16 keeps 8 significant bits), and an fp32 one almost none."""
    high = np.asarray(outputs, dtype=np.float64)
    high = high[high >= 0.5]
    assert high.size > 10, "too few outputs >= 0.5 to tell"
    return float(np.mean(high * 256 == np.round(high * 256)))


@pytest.fixture(scope="module")
def faces():
    """Eight synthetic faces of several sizes as JPEGs, with their boxes."""
    rng = np.random.default_rng(11)
    out = []
    for size in [(160, 120), (200, 150), (320, 240), (250, 250), (96, 72), (300, 200),
                 (180, 240), (640, 480)]:
        image, _, bbox = render_face(rng, size)
        out.append((jpeg(image), bbox))
    return out


def device_inputs(faces):
    encoded = [data for data, _ in faces]
    crops, sizes = [], []
    for data, bbox in faces:
        info, crop = probe_and_crop(data, bbox)
        crops.append(crop)
        sizes.append((info.width, info.height))
    return encoded, np.array(crops), np.array(sizes)


# --------------------------------------------------------------------------------------------
# Precision: the head in fp32 under bf16 autocast


def test_bf16_runs_the_backbone_in_bf16_and_the_head_in_fp32():
    torch.manual_seed(0)
    model = build_model().eval()
    dtypes = {}
    model.features.register_forward_hook(lambda m, i, o: dtypes.__setitem__("features", o.dtype))
    model.classifier[3].register_forward_hook(
        lambda m, i, o: dtypes.__setitem__("last linear", o.dtype))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    bf16 = ModelRunner(model, "cpu", precision="bf16")
    assert bf16.precision == "bf16" and bf16.channels_last
    low = bf16.run(pixels)
    assert dtypes == {"features": torch.bfloat16, "last linear": torch.float32}
    high = ModelRunner(model, "cpu", precision="fp32").run(pixels)
    assert dtypes == {"features": torch.float32, "last linear": torch.float32}
    # A bf16 head rounded every output >= 0.5 to 1/256 of the crop; an fp32 one does not.
    assert on_bf16_grid(low) < 0.05
    difference = np.abs(low - high).max()
    assert 0 < difference < 0.01, difference  # the bf16 backbone, not a rounded head


def test_precision_defaults_follow_the_device():
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        InferConfig(input="i", output="o", precision="fp16")


def test_fp32_means_ieee_fp32_in_processes_that_run_a_model():
    """TF32 would make the detector's scores near --face-threshold differ between CPU and GPU:
    loading the detector or a runner turns it off for the process."""
    from pipeline.model.detector import load_detector

    for make in (lambda: load_detector("cpu"),
                 lambda: ModelRunner(torch.nn.Linear(3, 136), "cpu")):
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
        make()
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32


def test_the_inference_job_in_bf16_with_device_decoding_on_the_cpu(ray_session, tmp_path,
                                                                   weights_file, caplog):
    """The job with --precision bf16 on CPU actors, in both decode modes, on two boxed JPEG
    faces, a PNG and a JPEG the decoder refuses: landmarks off the bf16 grid, the two decode
    paths within the stated tolerance; with --decode gpu the batched decode fails on the bad
    JPEG and is bisected, and the CPU fallbacks by reason reach the summary line, the manifest
    and a warning (2 of 4 images)."""
    rng = np.random.default_rng(4)
    members = []
    for i, size in enumerate([(320, 240), (250, 250)]):
        image, _, bbox = render_face(rng, size)
        members += [(f"f{i}.jpg", jpeg(image)), (f"f{i}.json", json.dumps({"bbox": bbox}).encode())]
    png = io.BytesIO()
    image.save(png, "PNG")
    members += [("p.png", png.getvalue()), ("x.jpg", bad_table(jpeg(image)))]
    write_tar(tmp_path / "faces.tar", members)
    results = {}
    for decode in ("cpu", "gpu"):
        cfg = InferConfig(input=str(tmp_path / "faces.tar"), output=str(tmp_path / decode),
                          weights=weights_file[0], device="cpu", decode=decode, batch_size=4,
                          precision="bf16", detect="never", max_error_fraction=1.0)
        caplog.clear()
        with caplog.at_level("INFO", logger="pipeline"):
            summary = run_inference(cfg)
        assert (summary.samples, summary.errors) == (4, 1)
        table = pq.read_table(summary.files[0])
        assert "device_decode" not in table.column_names  # counted, not written
        manifest = json.loads((tmp_path / decode / "_manifest.json").read_text())
        assert manifest["config"]["precision"] == "bf16"
        results[decode] = table.to_pydict()
        warnings = [r.levelname for r in caplog.records if "took the CPU path" in r.getMessage()]
        if decode == "cpu":
            assert manifest["device_decode"] == {"decoded_on_device": 0, "cpu_fallbacks": {}}
            assert "decoded on the device" not in summary.line() and not warnings
            continue
        assert (summary.device_decoded, summary.cpu_fallbacks) == (
            2, {"format": 1, "decoder_error": 1})
        assert ("2 images decoded on the device, 2 on the CPU instead (decoder_error: 1, "
                "format: 1)") in summary.line()
        assert manifest["device_decode"] == {"decoded_on_device": 2,
                                             "cpu_fallbacks": {"decoder_error": 1, "format": 1}}
        assert warnings == ["WARNING"]
    cpu, gpu = results["cpu"], results["gpu"]
    assert cpu["key"] == gpu["key"] == ["f0", "f1", "p", "x"]
    assert cpu["width"] == gpu["width"] and cpu["crop"][:3] == gpu["crop"][:3]
    assert cpu["error_kind"] == gpu["error_kind"] == [None, None, None, "decode"]
    a, b = (np.asarray(t["landmarks"][:3], dtype=np.float64) for t in (cpu, gpu))
    assert np.abs(a - b).max() <= LANDMARK_TOLERANCE_PX
    crops = np.asarray(cpu["crop"][:3], dtype=np.float64)  # x0, y0, x1, y1 in source pixels
    outputs = (a - crops[:, None, :2]) / (crops[:, None, 2:] - crops[:, None, :2])
    assert on_bf16_grid(outputs) < 0.05


def _tiny_backbone_model():
    """The real network with its 13 conv layers replaced by one (224 -> 7 x 7 x 512): the head,
    its fp32 wrapping and the training code are the real ones, at a cost the CPU can pay."""
    torch.manual_seed(0)
    model = build_model()
    model.features = torch.nn.Sequential(torch.nn.Conv2d(3, 512, 32, stride=32), torch.nn.ReLU())
    return model


def _batches(tmp_path, context: float):
    from pipeline.stages.labels import LabelledReader

    write_sample_archive(str(tmp_path / "faces"), num_shards=1, samples_per_shard=4, seed=3,
                         image_size=(160, 120))
    (shard,) = list_shards(str(tmp_path / "faces"))
    out = []
    for batch in LabelledReader(context=context, rows_per_batch=4).read(shard):
        out.append({k: torch.from_numpy(np.asarray(batch[k]))
                    for k in ("pixels", "landmarks", "pixel_uv", "key_hash")})
    return out


def test_a_training_step_in_bf16_trains_the_head_in_fp32(tmp_path):
    from pipeline.training.augment import AugmentConfig
    from pipeline.training.loop import build_optimizer, train_epoch

    model = _tiny_backbone_model()
    seen = {}
    model.features.register_forward_hook(lambda m, i, o: seen.__setitem__("features", o.dtype))
    model.classifier.register_forward_hook(
        lambda m, i, o: seen.__setitem__("out", o.detach().float().numpy()))
    before = model.classifier[3].weight.detach().clone()
    optimizer = build_optimizer(model, 1e-3, 1.0, 0.0)
    loss, images, steps = train_epoch(
        model, _batches(tmp_path, 1.25), optimizer, augment=AugmentConfig.none(), context=1.25,
        loss_kind="l1", device=torch.device("cpu"), seed=0, rank=0, first_step=0,
        precision="bf16")
    assert (images, steps) == (4, 1) and np.isfinite(loss)
    assert seen["features"] == torch.bfloat16  # autocast was on ...
    assert on_bf16_grid(seen["out"]) < 0.05  # ... and the outputs the loss saw are not rounded
    assert not torch.equal(model.classifier[3].weight, before)


def test_validation_in_bf16_scores_fp32_points(tmp_path):
    """Validation's NME comes from the fp32 head's points, in float64: equal to the NME of the
    points the head gave, which are off the bf16 grid. cuDNN's autotuner is off inside."""
    from pipeline.model.metrics import point_errors
    from pipeline.training.loop import VAL_FIELDS, validate

    model = _tiny_backbone_model()
    seen = {}

    def head(module, args, output):
        seen["out"] = output.detach()
        seen["benchmark"] = torch.backends.cudnn.benchmark

    model.classifier.register_forward_hook(head)
    batches = _batches(tmp_path, 1.0)
    torch.backends.cudnn.benchmark = True
    try:
        sums = validate(model, batches, device=torch.device("cpu"), precision="bf16")
        assert torch.backends.cudnn.benchmark  # restored
    finally:
        torch.backends.cudnn.benchmark = False
    assert seen["benchmark"] is False and seen["out"].dtype == torch.float32
    out = seen["out"].numpy()
    assert on_bf16_grid(out) < 0.05
    expected = point_errors(out.reshape(-1, 68, 2), batches[0]["landmarks"].numpy())
    values = dict(zip(VAL_FIELDS, sums.tolist(), strict=True))
    assert values["count"] == 4
    assert values["nme"] == pytest.approx(expected.mean(1).sum(), rel=1e-12)


# --------------------------------------------------------------------------------------------
# The device decode: batched calls, the memory budget, bisection, out of memory, fallbacks


@pytest.fixture
def decode_calls(monkeypatch):
    """Every batched decode call: the number of images and their stored pixels."""
    calls = []
    real = gpu_decode._decode_call
    monkeypatch.setattr(gpu_decode, "_decoder_works", {"cpu": True})  # no probe call

    def spy(tensors, device):
        calls.append([gpu_decode.jpeg_pixels(t.numpy()) for t in tensors])
        return real(tensors, device)

    monkeypatch.setattr(gpu_decode, "_decode_call", spy)
    return calls


def test_a_bad_image_in_a_batch_is_found_by_bisection(faces, decode_calls):
    encoded, crops, sizes = device_inputs(faces)
    encoded[5] = bad_table(encoded[5])
    pixels, failed = decode_crop_resize(encoded, [1] * 8, crops, "cpu", stored_sizes=sizes)
    assert failed == {5: "decoder_error"}
    for i in (0, 1, 2, 3, 4, 6, 7):
        np.testing.assert_array_equal(pixels[i].numpy(), preprocess(*faces[i])[0])
    assert not pixels[5].any()
    # 8 fails -> 4 ok, 4 fails -> 2 fails -> 1 ok, 1 fails; 2 ok: 7 calls, not 1 + 8.
    assert [len(c) for c in decode_calls] == [8, 4, 4, 2, 1, 1, 2]


def test_decode_calls_hold_at_most_the_pixel_budget(faces, decode_calls):
    encoded, crops, sizes = device_inputs(faces)
    whole, _ = decode_crop_resize(encoded, [1] * 8, crops, "cpu", stored_sizes=sizes)
    assert [len(c) for c in decode_calls] == [8]
    decode_calls.clear()
    budget = 100_000  # pixels: a 320x240 face alone nearly fills it; the 640x480 goes alone
    parts, failed = decode_crop_resize(encoded, [1] * 8, crops, "cpu", stored_sizes=sizes,
                                       pixel_budget=budget)
    assert failed == {} and torch.equal(parts, whole)
    assert len(decode_calls) > 3
    assert all(sum(c) <= budget or len(c) == 1 for c in decode_calls), decode_calls
    assert sorted(p for c in decode_calls for p in c) == sorted(w * h for w, h in sizes)
    assert budget_parts([5, 5, 20, 5, 5, 5], 10, max_count=None) == [[0, 1], [2], [3, 4], [5]]
    assert budget_parts([1] * 5, 10, max_count=2) == [[0, 1], [2, 3], [4]]


def test_decode_budget_is_a_share_of_the_free_device_memory(monkeypatch):
    assert decode_budget("cpu") == gpu_decode.CPU_DECODE_PIXELS
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 6 * gib)
    # (40 GiB free + 4 GiB cached) * 0.25 / 6 bytes a pixel
    assert decode_budget(torch.device("cuda")) == int(44 * gib * 0.25 / 6)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (gib // 8, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    assert decode_budget(torch.device("cuda")) == gpu_decode.MIN_DECODE_PIXELS


def out_of_memory_above(monkeypatch, limit: int):
    """torchvision's decoder runs out of memory on calls of more than ``limit`` images."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    sizes = []

    def decode_jpeg(tensors, **kwargs):
        sizes.append(len(tensors))
        if len(tensors) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(tensors, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    return sizes


def test_out_of_memory_in_the_decoder_splits_the_call(faces, monkeypatch):
    encoded, crops, sizes = device_inputs(faces)
    whole, _ = decode_crop_resize(encoded, [1] * 8, crops, "cpu", stored_sizes=sizes)
    calls = out_of_memory_above(monkeypatch, 3)
    pixels, failed = decode_crop_resize(encoded, [1] * 8, crops, "cpu", stored_sizes=sizes)
    assert failed == {} and torch.equal(pixels, whole)
    assert calls == [8, 4, 2, 2, 4, 2, 2]
    calls = out_of_memory_above(monkeypatch, 0)  # not even one image fits
    pixels, failed = decode_crop_resize(encoded[:2], [1, 1], crops[:2], "cpu")
    assert failed == {0: "out_of_memory", 1: "out_of_memory"} and not pixels.any()


def test_the_streams_are_ordered_before_every_decode_call(faces, monkeypatch):
    """nvJPEG writes on its own stream without waiting for the caller's (pytorch/vision#9606):
    the caller's stream is drained before every call, the split retries included."""
    import torchvision.io

    events = []
    real_decode = torchvision.io.decode_jpeg
    monkeypatch.setattr(gpu_decode, "_order_streams",
                        lambda device: events.append(("order", str(device))))
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda tensors, **kw: (
        events.append(("decode", str(kw["device"]))), real_decode(tensors, **kw))[1])
    encoded, crops, _ = device_inputs(faces[:4])
    encoded[2] = bad_table(encoded[2])
    decode_crop_resize(encoded, [1] * 4, crops, "cpu")
    decodes = [i for i, e in enumerate(events) if e[0] == "decode"]
    assert len(decodes) == 5  # 4 -> 2 + 2 -> 1 + 1
    assert all(events[i - 1] == ("order", "cpu") for i in decodes), events


def test_ordering_drains_the_callers_cuda_stream(monkeypatch):
    synced = []

    class Stream:
        def synchronize(self):
            synced.append(True)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    gpu_decode._order_streams(torch.device("cuda"))
    assert synced == [True]
    gpu_decode._order_streams(torch.device("cpu"))  # nothing to order on the CPU
    assert synced == [True]


def test_a_torchvision_without_a_device_decoder_is_seen_once(faces, monkeypatch, caplog):
    import torchvision.io

    calls = []

    def no_nvjpeg(tensors, **kwargs):
        calls.append(len(tensors))
        raise RuntimeError("torchvision was not compiled with nvjpeg support")

    monkeypatch.setattr(gpu_decode, "_decoder_works", {})
    monkeypatch.setattr(torchvision.io, "decode_jpeg", no_nvjpeg)
    encoded, crops, _ = device_inputs(faces)
    for _ in range(2):
        _, failed = decode_crop_resize(encoded, [1] * 8, crops, "cpu")
        assert failed == dict.fromkeys(range(8), "no_device_decoder")
    assert calls == [1]  # one probe of a tiny JPEG, not a bisection of every batch
    assert caplog.text.count("cannot decode JPEGs on cpu") == 1


def test_predictor_falls_back_per_reason_and_gets_the_same_landmarks(faces, weights_file,
                                                                     monkeypatch, tmp_path):
    """--decode gpu rows through the predictor with the decoder out of memory above 2 images
    and a bad JPEG among them: every good image decoded (the bad one an error row), the same
    landmarks as with no trouble, and each image's path in ``device_decode``."""
    from pipeline.stages.predictor import LandmarkPredictor, PredictorSettings, decode_counts

    rng = np.random.default_rng(8)
    image, _, bbox = render_face(rng, (200, 150))
    png = io.BytesIO()
    image.save(png, "PNG")
    members = []
    for i, (data, box) in enumerate(faces[:5]):
        members += [(f"j{i}.jpg", data), (f"j{i}.json", json.dumps({"bbox": box}).encode())]
    members += [("p.png", png.getvalue()), ("x.jpg", bad_table(faces[0][0]))]
    (shard,) = list_shards(str(write_tar(tmp_path / "mixed.tar", members)))
    (rows,) = list(ShardReader(ReaderSettings(decode="gpu", unit_rows=64,
                                              detect="never")).read(shard))
    (pixels_rows,) = list(ShardReader(ReaderSettings(decode="cpu", unit_rows=64,
                                                     detect="never")).read(shard))
    predictor = LandmarkPredictor(PredictorSettings(weights=weights_file[0], device="cpu",
                                                    micro_batch=8))
    clean = predictor(rows)
    assert clean["device_decode"].tolist() == ["ok"] * 5 + ["format", "decoder_error"]
    assert decode_counts(clean["device_decode"]) == {"ok": 5, "format": 1, "decoder_error": 1}
    assert clean["error_kind"].tolist() == [""] * 6 + ["decode"]
    reference = predictor(pixels_rows)["landmarks"]
    assert np.abs(clean["landmarks"][:6] - reference[:6]).max() <= LANDMARK_TOLERANCE_PX
    out_of_memory_above(monkeypatch, 2)
    squeezed = predictor(rows)
    assert squeezed["device_decode"].tolist() == clean["device_decode"].tolist()
    np.testing.assert_array_equal(squeezed["landmarks"], clean["landmarks"])
    out_of_memory_above(monkeypatch, 0)
    starved = predictor(rows)  # every JPEG alone out of memory: PIL decodes them
    assert starved["device_decode"].tolist() == ["out_of_memory"] * 5 + [
        "format", "out_of_memory"]
    assert starved["error_kind"].tolist() == clean["error_kind"].tolist()
    assert np.abs(starved["landmarks"][:6] - clean["landmarks"][:6]).max() <= (
        LANDMARK_TOLERANCE_PX)


# --------------------------------------------------------------------------------------------
# The runner's pipelined path and its out-of-memory handling, on the CPU


def test_the_pipelined_runner_runs_on_the_cpu_and_survives_out_of_memory_at_the_copy():
    pixels = np.random.default_rng(5).integers(0, 256, (10, 224, 224, 3), dtype=np.uint8)
    torch.manual_seed(0)
    model = TinyModel()
    reference = ModelRunner(model, "cpu", micro_batch=10).run(pixels)
    runner = ModelRunner(model, "cpu", micro_batch=8)
    copies = []
    real = runner._to_device

    def to_device(host, state, slot):
        copies.append((len(host), slot))
        if len(host) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated copy)")
        return real(host, state, slot)

    runner._to_device = to_device
    out = runner.run(pixels)
    np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-7)
    assert runner.micro_batch == 2  # 8 -> 4 -> 2
    # Through both host buffers in turn, the copies that failed retried smaller.
    assert copies == [(8, 0), (4, 0), (2, 0), (2, 1), (2, 0), (2, 1), (2, 0)]
    state = runner._thread_state()
    assert len(state.buffers) == 2 and state.compute is None  # no streams on the CPU


def test_a_compiled_model_is_called_by_one_thread_at_a_time():
    """torch.compile is not thread-safe (pytorch/pytorch#105943): with two calls at once per
    actor the compiled forward runs under a lock; the threads' other work still overlaps."""
    pixels = np.random.default_rng(7).integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    torch.manual_seed(0)
    runner = ModelRunner(TinyModel(), "cpu", micro_batch=2, compile=True,
                         compile_backend="eager")
    compiled = runner._forward
    inside, most, held = [0], [0], []
    both_in_run = threading.Barrier(2, timeout=60)
    guard = threading.Lock()

    def forward(x):
        held.append(runner._forward_lock.locked())
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return compiled(x)
        finally:
            with guard:
                inside[0] -= 1

    runner._forward = forward
    results = {}

    def call(name):
        both_in_run.wait()
        results[name] = runner.run(pixels)

    threads = [threading.Thread(target=call, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(held) == 6 and all(held) and most[0] == 1
    np.testing.assert_array_equal(results["a"], results["b"])


# --------------------------------------------------------------------------------------------
# Planning GPU actors


def test_more_predictors_than_gpus_is_refused_at_planning():
    with pytest.raises(ValueError, match=r"--num-predictors 3 with --gpus-per-predictor 1 "
                                         r"needs 3 GPUs, but the Ray cluster has 2: lower "
                                         r"--num-predictors to 2"):
        plan(InferConfig(input="i", output="o", num_predictors=3), 32, 2)
    shared = plan(InferConfig(input="i", output="o", gpus_per_predictor=0.5), 32, 2)
    assert (shared.predictors.count, shared.predictors.actor_gpus) == (4, 0.5)
    assert plan(InferConfig(input="i", output="o", gpus_per_predictor=0.5, num_predictors=3),
                32, 2).predictors.count == 3
    with pytest.raises(ValueError, match="gpus_per_predictor must be in"):
        InferConfig(input="i", output="o", gpus_per_predictor=2)
    cpu = plan(InferConfig(input="i", output="o", num_predictors=3), 8, 0)
    assert (cpu.predictors.count, cpu.predictors.actor_gpus, cpu.precision) == (3, 0.0, "fp32")
    assert plan(InferConfig(input="i", output="o"), 32, 2).precision == "bf16"
    assert plan(InferConfig(input="i", output="o", precision="fp32"), 32, 2).precision == "fp32"


class SlowStartingPredictor:
    """The first actor to start holds its model at once; every other one never finishes
    starting (as an actor Ray cannot place stays pending). ``claim``: a file path, set on a
    subclass per test."""

    claim = ""

    def __init__(self, settings=None, weights_data=None):  # as LandmarkPredictor
        import os
        import time

        try:
            os.close(os.open(self.claim, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            while True:
                time.sleep(60)

    def __call__(self, rows):
        import time

        # Busy for a while, as a GPU is: the next unit is read meanwhile, and a driver that
        # picks the least loaded actor whatever its state would send it to the pending one.
        time.sleep(0.3)
        n = len(rows["key"])
        out = {k: v for k, v in rows.items() if k != "pixels"}
        out["landmarks"] = np.zeros((n, 68, 2), np.float32)
        out["model_version"] = np.full(n, "stand-in", dtype=object)
        return out


def test_units_go_only_to_predictors_that_have_started(ray_session, tmp_path):
    """Two actors, one never starts: every unit goes to the other and the job ends (units sent
    to the pending one would have waited until --stall-timeout)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    write_sample_archive(str(tmp_path / "in"), 4, 1, image_size=(32, 32))
    cfg = InferConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), batch_size=1,
                      unit_rows=1, device="cpu", num_predictors=2, stall_timeout=60)
    predictor = type("Claimed", (SlowStartingPredictor,), {"claim": str(tmp_path / "claim")})
    summary = run_inference(cfg, predictor=predictor)
    assert (summary.samples, summary.errors, summary.files_committed) == (4, 0, 4)
    assert summary.predictor_calls == 4


# --------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_head_is_fp32(weights_file):
    pixels = np.random.default_rng(9).integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)
    bf16 = ModelRunner(weights_file[1], "cuda", precision="bf16").run(pixels)
    fp32 = ModelRunner(weights_file[1], "cuda", precision="fp32").run(pixels)
    cpu = ModelRunner(weights_file[1], "cpu", precision="fp32").run(pixels)
    assert on_bf16_grid(bf16) < 0.05
    # IEEE fp32 on both devices: the same outputs to float rounding.
    assert np.abs(fp32 - cpu).max() < 1e-4
    assert np.abs(bf16 - fp32).max() < 0.01


@pytest.mark.gpu
@needs_cuda
def test_cuda_decode_is_not_corrupted_by_queued_work(faces):
    """The harness of pytorch/vision#9606, through this module: queue work that reads tensors,
    free them while it is queued, decode; the queued reductions must see their own data."""
    encoded, crops, sizes = device_inputs(faces)
    reference, _ = decode_crop_resize(encoded, [1] * 8, crops, "cuda", stored_sizes=sizes)
    wrong = 0
    for _ in range(50):
        values = [torch.full((1 << 20,), float(k), device="cuda") for k in range(16)]
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):  # ~tens of ms queued on the stream
            big = big @ big / 4096
        sums = [v.sum() for v in values]
        del values  # freed while the reductions are still queued
        pixels, failed = decode_crop_resize(encoded, [1] * 8, crops, "cuda",
                                            stored_sizes=sizes)
        assert failed == {}
        got = torch.stack(sums).cpu()
        wrong += int(not torch.equal(got, torch.arange(16.0) * (1 << 20)))
        wrong += int(not torch.equal(pixels, reference))
    assert wrong == 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_detector_scores_match_the_cpu(faces):
    """IEEE fp32 on both: the detector's scores agree to 1e-4, boxes to 0.05 px."""
    from support.helpers import DATA

    from pipeline.model.detector import detect, load_detector
    from pipeline.stages.preprocess import decode_image

    images = [torch.from_numpy(np.array(decode_image((DATA / name).read_bytes())))
              .permute(2, 0, 1) for name in ("takeo.ppm", "breakingbad.jpg")]
    on = {}
    for device in ("cpu", "cuda"):
        model = load_detector(device)
        on[device] = detect(model, [i.to(device) for i in images], 0.5, 10, 0.0)
    for a, b in zip(on["cpu"], on["cuda"], strict=True):
        assert len(a.scores) == len(b.scores)
        assert torch.allclose(a.scores, b.scores.cpu(), atol=1e-4)
        assert torch.allclose(a.boxes, b.boxes.cpu(), atol=0.05)


@pytest.mark.gpu
@needs_cuda
def test_cuda_decode_paths_agree_within_the_tolerance(faces, weights_file):
    encoded, crops, sizes = device_inputs(faces)
    pixels, failed = decode_crop_resize(encoded, [1] * 8, crops, "cuda", stored_sizes=sizes)
    assert failed == {}
    for i, (data, bbox) in enumerate(faces):
        assert TOLERANCE.check(pixels[i].cpu().numpy(), preprocess(data, bbox)[0])[2]
    references = np.stack([preprocess(data, bbox)[0] for data, bbox in faces])
    runner = ModelRunner(weights_file[1], "cuda", precision="bf16")
    device_points = to_pixels(runner.run(pixels), crops)
    cpu_points = to_pixels(runner.run(references), crops)
    assert np.abs(device_points - cpu_points).max() <= LANDMARK_TOLERANCE_PX
