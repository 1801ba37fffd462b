"""Unit tests for pipeline.model.network: architecture, model file round trip, validation, init
paths.

The VGG16 forward pass costs ~0.5 s per image on CPU: only a handful of images go through it and
every model is built once per module.
"""

import os

import fsspec
import pytest
import torch
from torch import nn

from pipeline.model.identity import ModelChanged, check_loaded, init_version, model_identity
from pipeline.model.network import (
    ARCH,
    FILE_FORMAT,
    INPUT_SIZE,
    LANDMARK_SCHEME,
    load_model,
    read_model_file,
    save_model,
    weights_version,
)


@pytest.fixture(scope="module")
def random_model():
    """(model, info) from init="random", seed=0."""
    return load_model(init="random", seed=0)


@pytest.fixture(scope="module")
def torchvision_vgg16_state():
    """A seeded torchvision vgg16(weights=None) state dict (stands in for the ImageNet file)."""
    from torchvision.models import vgg16

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        state = vgg16(weights=None).state_dict()
    return state


@pytest.fixture(scope="module")
def sample_input():
    return torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def forward(random_model, sample_input):
    """One forward pass of the random model on 2 images, recording the avgpool output."""
    model, _ = random_model
    seen = {}
    handle = model.avgpool.register_forward_hook(lambda m, i, o: seen.update(avgpool=o))
    try:
        with torch.no_grad():
            out = model(sample_input)
    finally:
        handle.remove()
    return out, seen["avgpool"]


@pytest.fixture()
def memory_dir():
    fs = fsspec.filesystem("memory")
    root = "/test-model-files"
    yield f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


def test_features_match_torchvision_vgg16(random_model, torchvision_vgg16_state):
    model, _ = random_model
    ours = model.features.state_dict()
    theirs = {
        k[len("features.") :]: v
        for k, v in torchvision_vgg16_state.items()
        if k.startswith("features.")
    }
    assert list(ours) == list(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5


def test_avgpool_head(random_model):
    model, _ = random_model
    layers = list(model.avgpool)
    assert [type(m) for m in layers] == [nn.Conv2d, nn.MaxPool2d, nn.Flatten]
    conv, pool, _ = layers
    assert (conv.in_channels, conv.out_channels) == (512, 512)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (0, 0)
    assert conv.bias is not None
    assert pool.kernel_size == 2 and pool.stride == 2


def test_classifier_head(random_model):
    model, _ = random_model
    layers = list(model.classifier)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.Sigmoid]
    fc1, _, dropout, fc2, _ = layers
    assert (fc1.in_features, fc1.out_features) == (2048, 512)
    assert dropout.p == 0.5
    assert (fc2.in_features, fc2.out_features) == (512, 136)


def test_model_is_in_eval_mode(random_model):
    model, _ = random_model
    assert not model.training
    assert not any(m.training for m in model.modules())


def test_forward_shapes_and_range(forward):
    out, after_avgpool = forward
    assert tuple(after_avgpool.shape) == (2, 2048)
    assert tuple(out.shape) == (2, 136)
    assert out.dtype == torch.float32
    assert bool(((out > 0) & (out < 1)).all())
    # The two different images give different outputs (the model does look at its input).
    assert not torch.equal(out[0], out[1])


# --------------------------------------------------------------------------------------------
# Model file round trip
# --------------------------------------------------------------------------------------------


def _check_payload(payload, version, metadata):
    assert payload["format"] == FILE_FORMAT == "face-landmarks-model"
    assert payload["format_version"] == 1
    assert payload["arch"] == ARCH == "vgg16-keypoints-68"
    assert payload["input_size"] == INPUT_SIZE == 224
    assert payload["landmark_scheme"] == LANDMARK_SCHEME == "ibug68"
    assert payload["version"] == version
    assert payload["metadata"] == metadata


def test_save_load_local_round_trip(tmp_path, random_model, forward, sample_input):
    model, info = random_model
    uri = str(tmp_path / "models" / "m.pt")
    os.makedirs(tmp_path / "models")
    metadata = {"run": "unit-test", "epochs": 3, "nme": 0.125}
    version = save_model(model, uri, metadata=metadata)

    assert version == weights_version(model.state_dict())
    assert len(version) == 16 and int(version, 16) >= 0
    # A model without a file is named by what built it; its file by its weights.
    assert info.version == init_version("random", 0) != version

    payload = read_model_file(uri)
    _check_payload(payload, version, metadata)
    assert set(payload["state_dict"]) == set(model.state_dict())
    assert weights_version(payload["state_dict"]) == version

    loaded, loaded_info = load_model(uri)
    assert loaded_info.version == version
    assert loaded_info.source == uri
    assert loaded_info.metadata == metadata
    # The driver's view, read without the tensors, is the same.
    assert model_identity(uri) == loaded_info
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        out = loaded(sample_input)
    assert torch.allclose(out, forward[0], rtol=0, atol=0)


def test_save_load_memory_round_trip(memory_dir, random_model):
    model, info = random_model
    uri = f"{memory_dir}/nested/m.pt"
    version = save_model(model, uri)
    assert version == weights_version(model.state_dict())
    payload = read_model_file(uri)
    _check_payload(payload, version, {})
    loaded, loaded_info = load_model(uri)
    assert loaded_info == type(loaded_info)(version, uri, {}) == model_identity(uri)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_weights_version_changes_with_one_weight(random_model):
    model, _ = random_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = weights_version(state)
    # Key order does not matter.
    assert weights_version(dict(reversed(list(state.items())))) == base
    state["classifier.3.bias"][5] += 1e-3
    changed = weights_version(state)
    assert changed != base and len(changed) == 16
    state["classifier.3.bias"][5] -= 1e-3
    assert weights_version(state) == base
    # Same bytes, different dtype or name: a different version.
    assert weights_version({"a": torch.zeros(4)}) != weights_version({"b": torch.zeros(4)})
    assert weights_version({"a": torch.zeros(4)}) != weights_version(
        {"a": torch.zeros(4, dtype=torch.int32)}
    )


def test_random_init_is_deterministic_per_seed(random_model):
    model, info = random_model
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    again, again_info = load_model(init="random", seed=0)
    # The seeding happens in a forked RNG: the caller's global RNG stream is untouched.
    assert torch.equal(torch.rand(3), expected)
    other, other_info = load_model(init="random", seed=1)
    assert info.source == "init:random:seed=0" and other_info.source == "init:random:seed=1"
    assert again_info.version == info.version
    assert other_info.version != info.version
    # Same seed, same weights: what lets every actor (and the driver, which builds nothing)
    # name the model without comparing tensors.
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert weights_version(other.state_dict()) != weights_version(model.state_dict())
    assert model_identity(init="random", seed=0) == info
    assert model_identity(init="random", seed=1) == other_info
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert not torch.equal(other.state_dict()["features.0.weight"], model.features[0].weight)
    assert not torch.equal(other.state_dict()["classifier.3.weight"], model.classifier[3].weight)


# --------------------------------------------------------------------------------------------
# Bad model files
# --------------------------------------------------------------------------------------------


def test_random_bytes_are_rejected(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(ValueError, match="not a readable model file"):
        read_model_file(str(path))
    with pytest.raises(ValueError, match="not a readable model file"):
        load_model(str(path))
    with pytest.raises(ValueError, match="not a readable model file"):
        model_identity(str(path))


def test_plain_torch_dict_is_rejected(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"features.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="is not a face-landmarks-model file"):
        read_model_file(str(path))
    with pytest.raises(ValueError, match="is not a face-landmarks-model file"):
        model_identity(str(path))


def _fake_payload(**overrides):
    payload = {
        "format": FILE_FORMAT,
        "format_version": 1,
        "arch": ARCH,
        "input_size": INPUT_SIZE,
        "landmark_scheme": LANDMARK_SCHEME,
        "version": "0" * 16,
        "metadata": {},
        "state_dict": {"w": torch.zeros(1)},
    }
    payload.update(overrides)
    return payload


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"arch": "resnet50-keypoints-68"}, "arch is 'resnet50-keypoints-68', expected 'vgg16"),
        ({"input_size": 256}, "input_size is 256, expected 224"),
        ({"landmark_scheme": "wflw98"}, "landmark_scheme is 'wflw98', expected 'ibug68'"),
        ({"format_version": 2}, "format_version 2"),
        ({"format": "something-else"}, "is not a face-landmarks-model file"),
    ],
)
def test_wrong_header_fields_are_rejected(tmp_path, overrides, message):
    path = tmp_path / "bad.pt"
    torch.save(_fake_payload(**overrides), path)
    with pytest.raises(ValueError, match=message):
        read_model_file(str(path))
    with pytest.raises(ValueError, match=message):
        load_model(str(path))
    with pytest.raises(ValueError, match=message):
        model_identity(str(path))


@pytest.mark.parametrize(
    "state_dict",
    [
        {"w": torch.zeros(1)},  # weights of some other network
        None,  # no weights at all
    ],
    ids=["foreign-state-dict", "no-state-dict"],
)
def test_header_without_matching_weights_is_rejected(tmp_path, state_dict):
    # A file with a valid header but weights that do not fit the architecture is a bad model
    # file like any other: ValueError naming the problem (the CLI reports ValueError cleanly).
    payload = _fake_payload()
    if state_dict is None:
        del payload["state_dict"]
    else:
        payload["state_dict"] = state_dict
    path = tmp_path / "weights.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="state_dict"):
        load_model(str(path))
    if state_dict is None:
        with pytest.raises(ValueError, match="state_dict"):
            model_identity(str(path))
    else:  # the header is sound: the driver accepts it, the actors' load_model refuses it
        assert model_identity(str(path)).version == "0" * 16


def test_valid_header_is_accepted(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save(_fake_payload(), path)
    assert read_model_file(str(path))["version"] == "0" * 16


def test_missing_model_file(tmp_path, memory_dir):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        read_model_file(missing)
    with pytest.raises(FileNotFoundError):
        load_model(missing)
    with pytest.raises(FileNotFoundError):
        read_model_file(f"{memory_dir}/nope.pt")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        model_identity(missing)


# --------------------------------------------------------------------------------------------
# Init paths
# --------------------------------------------------------------------------------------------


def test_imagenet_init_reads_the_torchvision_cache(
    tmp_path, monkeypatch, torchvision_vgg16_state, random_model
):
    from torchvision.models import VGG16_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    file_name = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    assert file_name.endswith(".pth")
    torch.save(torchvision_vgg16_state, checkpoints / file_name)

    model, info = load_model(init="imagenet")
    assert info.source == "init:imagenet"
    assert info == model_identity(init="imagenet")
    assert info.version not in (init_version("random", 0), init_version("imagenet", 1))
    assert not model.training
    features = model.features.state_dict()
    for k, v in features.items():
        assert torch.equal(v, torchvision_vgg16_state[f"features.{k}"]), k
    # The heads come from the seeded random init, so every actor builds the same model.
    random, _ = random_model
    for k, v in model.state_dict().items():
        if not k.startswith("features."):
            assert torch.equal(v, random.state_dict()[k]), k
    assert info.version != random_model[1].version


def test_invalid_init():
    with pytest.raises(ValueError, match="init must be one of"):
        load_model(init="xavier")


def test_weights_that_do_not_match_their_version_are_rejected(tmp_path, random_model):
    path = tmp_path / "edited.pt"
    save_model(random_model[0], str(path))
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["classifier.3.bias"][0] += 1.0
    torch.save(payload, path)
    with pytest.raises(ValueError, match="the file is damaged or was edited"):
        load_model(str(path))


# --------------------------------------------------------------------------------------------
# The driver's view of the model: no torch, no network
# --------------------------------------------------------------------------------------------


def test_model_identity_reads_no_torch_and_no_tensor(weights_file, tmp_path):
    # In a fresh process: the inference job's driver module and the header read leave torch
    # unimported (it costs a process ~450 MB), and the file's tensor bytes are never read.
    import subprocess
    import sys

    probe = (
        "import sys, zipfile\n"
        "import pipeline.inference.job\n"
        "from pipeline.model.identity import model_identity\n"
        "opened = []\n"
        "real = zipfile.ZipFile.open\n"
        "def spy(self, name, *a, **k):\n"
        "    opened.append(name if isinstance(name, str) else name.filename)\n"
        "    return real(self, name, *a, **k)\n"
        "zipfile.ZipFile.open = spy\n"
        f"info = model_identity({weights_file[0]!r})\n"
        "print(info.version, 'torch' in sys.modules, *opened)\n"
    )
    version, torch_imported, *opened = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert version == weights_file[2]
    assert torch_imported == "False"
    assert len(opened) == 1 and opened[0].endswith("/data.pkl"), opened


def test_a_header_with_foreign_objects_is_refused_without_running_them(tmp_path):
    import fractions
    import pickle
    import zipfile

    path = tmp_path / "odd.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("odd/data.pkl", pickle.dumps({"format": fractions.Fraction(1, 2)}))
    with pytest.raises(ValueError, match="not a readable model file"):
        model_identity(str(path))
    bad_version = tmp_path / "bad-version.pt"
    torch.save(_fake_payload(version="not-hex"), bad_version)
    with pytest.raises(ValueError, match="version must be 16 hex digits"):
        model_identity(str(bad_version))


def test_an_actor_that_loads_another_version_stops_the_run(weights_file):
    from pipeline.stages.predictor import LandmarkPredictor, PredictorSettings

    info = model_identity(weights_file[0])
    check_loaded(info, info.version)
    check_loaded(info, None)
    with pytest.raises(ModelChanged, match="weights changed during the run") as caught:
        LandmarkPredictor(PredictorSettings(weights=weights_file[0], device="cpu",
                                            expected_version="0" * 16))
    assert caught.value.exit_code == 1  # a job that could not finish, said in one line
