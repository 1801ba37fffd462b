"""--decode cpu|gpu|auto through the stages and the job, the run plan, and the model runner."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from support.helpers import (
    LANDMARK_TOLERANCE_PX,
    SAME_DECODER_TOLERANCE,
    TOLERANCE,
    TinyModel,
    jpeg,
)

from pipeline.demo.synthetic import render_face
from pipeline.inference.config import InferConfig
from pipeline.inference.job import plan
from pipeline.io.shards import list_shards
from pipeline.stages.predictor import LandmarkPredictor, PredictorSettings
from pipeline.stages.reader import ReaderSettings, ShardReader
from pipeline.stages.runner import ModelRunner


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory):
    """JPEGs of several sizes and orientations with boxes, a PNG, a CMYK JPEG, a cut JPEG."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(5)
    members = []
    for i, (size, orientation) in enumerate([((640, 480), 1), ((320, 240), 6), ((250, 250), 3),
                                             ((96, 72), 8), ((1024, 768), 1)]):
        image, _, bbox = render_face(rng, size)
        members.append((f"j{i}.jpg", jpeg(image, orientation)))
        if orientation == 1:  # boxes in oriented pixels: only where orientation keeps them
            members.append((f"j{i}.json", json.dumps({"bbox": bbox}).encode()))
    image, _, _ = render_face(rng, (200, 150))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    members.append(("p.png", buf.getvalue()))
    members.append(("k.jpg", jpeg(image.convert("CMYK"))))
    members.append(("t.jpg", jpeg(image)[:1500]))  # cut short: no decoder can read it all
    write_tar(folder / "mixed.tar", members)
    return list_shards(str(folder))[0]


def rows_of(shard, decode):
    batches = list(ShardReader(ReaderSettings(decode=decode, unit_rows=64)).read(shard))
    assert len(batches) == 1
    return batches[0]


def test_gpu_mode_rows_carry_the_bytes_and_the_same_crops(mixed_shard):
    cpu, gpu = rows_of(mixed_shard, "cpu"), rows_of(mixed_shard, "gpu")
    assert "pixels" not in gpu and "encoded" not in cpu
    assert gpu["key"].tolist() == cpu["key"].tolist() == ["j0", "j1", "j2", "j3", "j4", "p", "k",
                                                          "t"]
    ok = np.asarray([not e for e in cpu["error"]])
    assert ok.tolist() == [True] * 7 + [False]  # the cut JPEG fails on the CPU path
    np.testing.assert_array_equal(gpu["crop"][ok], cpu["crop"][ok])
    np.testing.assert_array_equal(gpu["width"][ok], cpu["width"][ok])
    np.testing.assert_array_equal(gpu["height"][ok], cpu["height"][ok])
    assert gpu["orientation"][:4].tolist() == [1, 6, 3, 8]
    assert gpu["stored_size"][1].tolist() == [320, 240] and gpu["width"][1] == 240
    with tarfile.open(mixed_shard.uri) as tar:
        assert bytes(gpu["encoded"][0]) == tar.extractfile("j0.jpg").read()
    # The header looks fine, so the read task leaves the cut JPEG to the predictor.
    assert gpu["error"][7] == ""


def test_predictor_gives_the_cpu_paths_landmarks_from_encoded_rows(mixed_shard, weights_file):
    cpu, gpu = rows_of(mixed_shard, "cpu"), rows_of(mixed_shard, "gpu")
    predictor = LandmarkPredictor(PredictorSettings(weights=weights_file[0], device="cpu"))
    a, b = predictor(cpu), predictor(gpu)
    # PNG, CMYK JPEG and the cut JPEG went to PIL: the header says the device cannot take them.
    assert b["device_decode"].tolist() == ["ok"] * 5 + ["format"] * 3
    assert b["error"][7] == cpu["error"][7] and b["error_kind"][7] == "decode"
    assert (b["width"][7], b["height"][7]) == (0, 0) and np.isnan(b["crop"][7]).all()
    assert b["error_kind"].tolist() == a["error_kind"].tolist()
    assert np.isnan(b["landmarks"][7]).all()
    diff = np.abs(a["landmarks"][:7] - b["landmarks"][:7])
    assert diff.max() <= LANDMARK_TOLERANCE_PX
    # And the model input itself: on the CPU both paths decode with libjpeg-turbo, so the
    # crops must be the same to rounding (on CUDA, nvJPEG's noise: TOLERANCE, tested below).
    rows = np.arange(7)
    pixels, errors, paths = predictor.decode_on_device(gpu, rows)
    assert errors == {} and paths.tolist() == ["ok"] * 5 + ["format"] * 2
    for i in rows:
        mean, p99, within = SAME_DECODER_TOLERANCE.check(pixels[i].numpy(), cpu["pixels"][i])
        assert within, (gpu["key"][i], mean, p99)
    # The PNG took the CPU path inside the predictor: exactly the read task's pixels.
    np.testing.assert_array_equal(pixels[5].numpy(), cpu["pixels"][5])


def test_a_shifted_crop_is_outside_the_tolerance(mixed_shard, weights_file):
    """The tolerances are tight enough to see a geometry error of a few source pixels."""
    cpu, gpu = rows_of(mixed_shard, "cpu"), rows_of(mixed_shard, "gpu")
    gpu["crop"] = gpu["crop"].copy()
    side = gpu["crop"][0, 2]
    gpu["crop"][0, :2] += 2 * side / 224  # two pixels of the 224x224 input, along both axes
    predictor = LandmarkPredictor(PredictorSettings(weights=weights_file[0], device="cpu"))
    pixels, _, _ = predictor.decode_on_device(gpu, np.arange(1))
    assert not SAME_DECODER_TOLERANCE.check(pixels[0].numpy(), cpu["pixels"][0])[2]
    assert not TOLERANCE.check(pixels[0].numpy(), cpu["pixels"][0])[2]


@pytest.mark.parametrize("cpus, gpus, device, decode, expected", [
    (16, 1, "auto", "auto", (True, "gpu", 512, 1, 1, 2)),   # an H100 node: the GPU decodes
    (64, 1, "auto", "auto", (True, "cpu", 512, 1, 1, 2)),   # 64 cores outrun one GPU's model
    (96, 8, "auto", "auto", (True, "gpu", 512, 8, 1, 2)),   # 12 cores per GPU
    (2, 0, "auto", "auto", (False, "cpu", 16, 1, 1, 1)),    # this CPU machine
    (2, 0, "cpu", "gpu", (False, "gpu", 16, 1, 1, 1)),      # asked for: the CPU actor decodes
    (16, 1, "cpu", "auto", (False, "cpu", 16, 1, 15, 1)),   # CPU actors on a GPU cluster
])
def test_plan_resolves_the_auto_settings(cpus, gpus, device, decode, expected):
    p = plan(InferConfig(input="i", output="o", device=device, decode=decode), cpus, gpus)
    assert (p.use_gpu, p.decode, p.batch_size, p.predictors.count, p.predictors.actor_cpus,
            p.predictors.concurrency) == expected


@pytest.mark.parametrize("cpus, gpus, device", [
    (1, 0, "auto"), (2, 0, "auto"), (3, 0, "auto"), (16, 1, "cpu"), (2, 1, "auto"),
    (4, 8, "auto"), (18, 8, "auto"), (64, 8, "auto"), (2, 0, "cpu"), (1.5, 1, "auto")])
def test_plan_never_gives_away_more_cpus_than_the_cluster_has(cpus, gpus, device):
    """Actors, reserved commits and read tasks fit the cluster, and there is always at least
    one of each: no read can take the CPU a commit needs, no run can wait forever for a CPU."""
    p = plan(InferConfig(input="i", output="o", device=device), cpus, gpus)
    actors, slots = p.predictors, p.slots
    used = (actors.count * actors.actor_cpus + slots.max_commits * slots.commit_cpus
            + slots.max_reads * slots.read_cpus)
    assert used <= cpus + 1e-9, p
    assert slots.max_reads >= 1 and slots.max_commits >= 1 and min(
        slots.read_cpus, slots.commit_cpus, actors.actor_cpus) > 0
    assert p.unit_rows == (4096 if p.use_gpu else 4 * p.batch_size)


def test_plan_splits_this_machine_and_a_gpu_cluster():
    small = plan(InferConfig(input="i", output="o"), 2, 0)  # this 2-CPU machine, CPU model
    assert (small.predictors.actor_cpus, small.slots.max_commits, small.slots.commit_cpus,
            small.slots.max_reads, small.slots.read_cpus) == (1, 2, 0.25, 1, 0.5)
    big = plan(InferConfig(input="i", output="o"), 64, 8)  # 8 GPUs, 8 CPUs each
    assert (big.predictors.count, big.predictors.actor_cpus, big.slots.max_commits,
            big.slots.max_reads, big.slots.read_cpus) == (
        8, 1, 18, 51, 1.0)


def test_plan_overrides_and_errors():
    cfg = InferConfig(input="i", output="o", compile=True, num_predictors=2,
                      calls_per_predictor=3, cpus_per_predictor=4)
    p = plan(cfg, 32, 2)
    assert (p.batch_size, p.predictors.count, p.predictors.concurrency,
            p.predictors.actor_cpus) == (256, 2, 3, 4)
    assert plan(InferConfig(input="i", output="o", batch_size=100), 32, 2).batch_size == 100
    with pytest.raises(ValueError, match="has no GPUs"):
        plan(InferConfig(input="i", output="o", device="gpu"), 8, 0)
    with pytest.raises(ValueError, match="decode must be one of"):
        InferConfig(input="i", output="o", decode="tpu")


def test_runner_micro_batches_give_the_whole_batch_result():
    pixels = np.random.default_rng(0).integers(0, 256, (10, 224, 224, 3), dtype=np.uint8)
    torch.manual_seed(0)
    model = TinyModel()
    whole = ModelRunner(model, "cpu", micro_batch=10).run(pixels)
    model.calls.clear()
    parts = ModelRunner(model, "cpu", micro_batch=4).run(pixels)
    assert model.calls == [4, 4, 2]
    np.testing.assert_allclose(parts, whole, rtol=1e-6, atol=1e-7)
    assert ModelRunner(model, "cpu").run(pixels[:0]).shape == (0, 136)


def test_runner_halves_the_micro_batch_on_out_of_memory():
    """Out of memory in the forward pass, on the pipelined path (the CPU runs it too)."""
    pixels = np.random.default_rng(1).integers(0, 256, (10, 224, 224, 3), dtype=np.uint8)
    torch.manual_seed(0)
    reference = ModelRunner(TinyModel(), "cpu", micro_batch=10).run(pixels)
    torch.manual_seed(0)
    model = TinyModel(fail_above=3)
    runner = ModelRunner(model, "cpu", micro_batch=10)
    out = runner.run(pixels)
    assert runner.micro_batch == 2  # 10 -> 5 -> 2, and it stays there for later batches
    assert model.calls == [10, 5, 2, 2, 2, 2, 2]
    np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-7)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # even one image does not fit: give up
        ModelRunner(TinyModel(fail_above=0), "cpu", micro_batch=4).run(pixels[:4])


def test_compiled_runner_pads_to_one_shape():
    pixels = np.random.default_rng(2).integers(0, 256, (7, 224, 224, 3), dtype=np.uint8)
    torch.manual_seed(0)
    model = TinyModel()
    eager = ModelRunner(model, "cpu", micro_batch=4).run(pixels)
    model.calls.clear()
    # The "eager" backend runs the graph dynamo captured, without inductor's C++ compile time.
    compiled = ModelRunner(model, "cpu", micro_batch=4, compile=True, compile_backend="eager")
    out = compiled.run(pixels)
    assert set(model.calls) == {4}  # the warm-up, then 4 + 3 padded to 4
    np.testing.assert_allclose(out, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pipelined_runner_matches_one_pass(weights_file):
    from pipeline.model.network import load_model

    pixels = np.random.default_rng(3).integers(0, 256, (37, 224, 224, 3), dtype=np.uint8)
    model, _ = load_model(weights_file[0])
    one = ModelRunner(model, "cuda", micro_batch=64).run(pixels)
    piped = ModelRunner(model, "cuda", micro_batch=8).run(pixels)  # 5 micro-batches, 2 buffers
    on_device = ModelRunner(model, "cuda", micro_batch=8).run(torch.from_numpy(pixels).cuda())
    np.testing.assert_allclose(piped, one, atol=1e-2)
    np.testing.assert_allclose(on_device, one, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_predictor_matches_the_cpu_path(mixed_shard, weights_file):
    cpu, gpu = rows_of(mixed_shard, "cpu"), rows_of(mixed_shard, "gpu")
    predictor = LandmarkPredictor(PredictorSettings(weights=weights_file[0], device="cuda"))
    pixels, errors, _ = predictor.decode_on_device(gpu, np.arange(7))
    assert errors == {} and pixels.device.type == "cuda"
    for i in range(7):
        mean, p99, within = TOLERANCE.check(pixels[i].cpu().numpy(), cpu["pixels"][i])
        assert within, (gpu["key"][i], mean, p99)
    a = LandmarkPredictor(PredictorSettings(weights=weights_file[0], device="cuda"))
    a = a(cpu)["landmarks"][:7]
    b = predictor(gpu)["landmarks"][:7]
    # bf16 backbones with the fp32 head on both sides; pixels within TOLERANCE.
    assert np.abs(a - b).max() <= LANDMARK_TOLERANCE_PX
