"""YAML job configs: round trip, command-line overrides, errors that name the key."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cli.common import job_config
from pipeline.cli.main import main
from pipeline.cli.registry import parse_args
from pipeline.config.files import REDACTED, ConfigError, save_config


def write(path, text):
    path.write_text(text)
    return str(path)


def test_config_sets_options_and_flags_override(tmp_path):
    cfg = write(tmp_path / "job.yaml",
                "input: s3://bucket/shards/\noutput: s3://bucket/out/\nbatch-size: 128\n"
                "device: cpu\nforce: true\nmargin: 0.3\nmax_error_fraction: 0\n")
    args = parse_args(["infer", "--config", cfg, "--batch-size", "16", "--margin=0.2"])
    assert (args.input, args.output, args.device, args.force) == (
        "s3://bucket/shards/", "s3://bucket/out/", "cpu", True)
    assert args.batch_size == 16 and args.margin == 0.2  # the command line wins
    assert args.max_error_fraction == 0.0 and isinstance(args.max_error_fraction, float)
    plain = parse_args(["infer"])  # a config never leaks into a later parse
    assert plain.batch_size is None and plain.input is None


def test_resolved_config_round_trips(tmp_path):
    secrets = tmp_path / "s3.json"
    secrets.write_text(json.dumps({"key": "AKIA", "secret": "shh"}))
    cfg = write(tmp_path / "job.yaml", f"input: in/\noutput: out/\nweights: m.pt\n"
                f"storage_options: '@{secrets}'\nnum_predictors: 2\n")
    args = parse_args(["infer", "--config", cfg, "--seed", "3"])
    assert args.storage_options == {"key": "AKIA", "secret": "shh"}
    resolved = job_config(args)
    assert resolved["storage_options"] == f"@{secrets}"  # by reference: no secret in it
    assert resolved["seed"] == 3 and resolved["num_predictors"] == 2
    assert resolved["margin"] == 0.25  # defaults are written out too
    assert "config" not in resolved and "run" not in resolved

    saved = tmp_path / "resolved.yaml"
    save_config(resolved, str(saved))
    again = parse_args(["infer", "--config", str(saved)])
    assert job_config(again) == resolved
    assert again.storage_options == args.storage_options


def test_inline_storage_options_are_redacted(tmp_path):
    cfg = write(tmp_path / "job.yaml",
                "storage_options:\n  s3: {key: AKIA, secret: shh, endpoint_url: http://x}\n")
    args = parse_args(["infer", "--config", cfg])
    assert args.storage_options["s3"]["secret"] == "shh"
    text = yaml.safe_dump(job_config(args))
    assert "shh" not in text and "AKIA" not in text and REDACTED in text


@pytest.mark.parametrize("text, message", [
    ("batchsize: 8\n", "unknown key 'batchsize' (did you mean 'batch_size'?)"),
    ("batch_size: '8'\n", "key 'batch_size' must be an integer, got '8'"),
    ("batch_size: 8.5\n", "key 'batch_size' must be an integer"),
    ("batch_size: true\n", "key 'batch_size' must be an integer"),
    ("margin: wide\n", "key 'margin' must be a number"),
    ("force: 'yes'\n", "key 'force' must be true or false"),
    ("device: tpu\n", "key 'device' must be one of auto, gpu, cpu, got 'tpu'"),
    ("output: 2026\n", "key 'output' must be a string, got int 2026 (quote it"),
    ("storage_options: [1, 2]\n", "key 'storage_options' must be a mapping or '@file.json'"),
    ("storage_options: '@/no/such/file.json'\n", "cannot read storage options file"),
    ("batch_size: 8\nbatch-size: 9\n", "key 'batch-size' is given twice"),
    ("- input\n- output\n", "must hold a mapping of option: value, not a list"),
    ("input: [unclosed\n", "is not valid YAML"),
])
def test_bad_configs_name_the_key(tmp_path, capsys, text, message):
    cfg = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        parse_args(["infer", "--config", cfg])
    assert message in str(err.value) and str(cfg) in str(err.value)
    assert main(["infer", "--config", cfg]) == 2  # and the CLI says so with exit status 2
    assert message in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["infer", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_config_satisfies_required_options_of_other_jobs(tmp_path):
    cfg = write(tmp_path / "ft.yaml", "input: data/\nstorage_path: runs\nname: v1\nepochs: 3\n"
                "loss: l1\n")
    args = parse_args(["finetune", "--config", cfg, "--lr", "0.01"])
    assert (args.input, args.storage_path, args.name, args.epochs, args.loss, args.lr) == (
        "data/", "runs", "v1", 3, "l1", 0.01)
    with pytest.raises(ConfigError, match="unknown key 'fail_at_step'"):  # hidden test hooks
        parse_args(["finetune", "--config", write(tmp_path / "h.yaml", "fail_at_step: 2\n")])
    with pytest.raises(SystemExit):  # still required when neither the file nor a flag sets it
        parse_args(["finetune", "--config", write(tmp_path / "p.yaml", "input: data/\n")])
    nightly = parse_args(["nightly", "--config", write(tmp_path / "n.yaml",
                          "input: in/\noutput: out/\nsince: 2026-11-18\n")])
    assert nightly.since == "2026-11-18"  # unquoted in the YAML: a date, taken as text
    ev = parse_args(["evaluate", "--config",
                     write(tmp_path / "ev.yaml", "labels: l/\npredictions: p/\noutput: r.json\n")])
    assert (ev.labels, ev.predictions, ev.weights) == ("l/", "p/", None)


def test_infer_prints_and_saves_the_resolved_config(tmp_path, capsys, ray_session):
    from pipeline.demo.synthetic import write_sample_archive

    write_sample_archive(str(tmp_path / "in"), 1, 1, seed=3, image_size=(96, 72))
    out = tmp_path / "out"
    cfg = write(tmp_path / "job.yaml", f"input: {tmp_path / 'in'}\noutput: {out}\n"
                "device: cpu\nbatch_size: 2\n")
    assert main(["infer", "--config", cfg, "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "resolved config:\n" in printed and "seed: 5\n" in printed
    saved = yaml.safe_load((out / "_config.yaml").read_text())
    assert saved["seed"] == 5 and saved["batch_size"] == 2 and saved["input"] == str(
        tmp_path / "in")
    assert (out / "part-faces-00000.parquet").exists()


@pytest.mark.parametrize("command, given", [
    ("infer", {}),
    ("nightly", {"input": "in/", "output": "out/"}),
    ("finetune", {"input": "in/", "storage_path": "runs", "name": "v1"}),
    ("evaluate", {"labels": "l/", "predictions": "p/", "report": "r.json"}),
])
def test_flags_and_config_keys_come_from_the_config_dataclasses(tmp_path, command, given):
    """One schema: every option field of the command's dataclasses is a flag whose default is
    the field's and a config key that takes that default back; other fields are neither."""
    import dataclasses

    from pipeline.cli import registry
    from pipeline.config.files import check_config

    spec = registry.command(command)
    argv = [command] + [a for k, v in given.items() for a in (f"--{k.replace('_', '-')}", v)]
    args = parse_args(argv)
    keys = {o.name for o in spec.options()}
    seen = 0
    for schema in spec.schema:
        for f in dataclasses.fields(schema):
            meta = f.metadata.get("option")
            if not meta or not meta["cli"]:
                assert f.name not in keys and not hasattr(args, f.name), f.name
                continue
            seen += 1
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            assert getattr(args, f.name) == given.get(f.name, default), f.name
            if default is not None:
                assert check_config(spec.options(), {f.name: default}, "x") == {f.name: default}
    assert seen == len(keys) > 5


def test_old_spellings_work_for_a_release_and_name_the_new_one(tmp_path, capsys):
    """One vocabulary: a renamed flag, config key or value still works, with a warning that
    names what replaces it; the old flags are not in --help; the new names win everywhere."""
    import warnings

    from pipeline.evaluation.config import EvalConfig
    from pipeline.inference.config import InferConfig

    args = parse_args(["infer", "--predictor-cpus", "2", "--predictor-concurrency", "3",
                       "--device", "cuda"])
    assert (args.cpus_per_predictor, args.calls_per_predictor, args.device) == (2.0, 3, "gpu")
    err = capsys.readouterr().err
    for old, new in (("--predictor-cpus", "--cpus-per-predictor"),
                     ("--predictor-concurrency", "--calls-per-predictor"),
                     ("--device cuda", "--device gpu")):
        assert (f"warning: {old} is deprecated and will be removed in the next release: "
                f"use {new}") in err
    new = parse_args(["infer", "--cpus-per-predictor", "2", "--device", "gpu"])
    assert (new.cpus_per_predictor, new.device) == (2.0, "gpu")
    assert "deprecated" not in capsys.readouterr().err
    # In a config file: the old key and value, read as the new ones.
    cfg = write(tmp_path / "old.yaml", "input: i/\noutput: o/\npredictor_cpus: 4\ndevice: cuda\n")
    args = parse_args(["infer", "--config", cfg])
    assert (args.cpus_per_predictor, args.device) == (4.0, "gpu")
    err = capsys.readouterr().err
    assert "key 'predictor_cpus' is deprecated" in err and "use 'cpus_per_predictor'" in err
    assert "key 'device' 'cuda' is deprecated" in err and "use 'gpu'" in err
    # evaluate's JSON file is --report; --output was it.
    args = parse_args(["evaluate", "--labels", "l", "--predictions", "p", "--output", "r.json"])
    assert args.report == "r.json"
    assert "use --report" in capsys.readouterr().err
    # Python: the old value is taken, with a DeprecationWarning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert InferConfig("i", "o", device="cuda").device == "gpu"
        assert EvalConfig(labels="l", predictions="p", report="r", detect="auto").detect == "auto"
    assert [str(w.message) for w in caught] == ["device='cuda' is deprecated: use 'gpu'"]
    # --help shows the new names only.
    with pytest.raises(SystemExit):
        parse_args(["infer", "--help"])
    shown = capsys.readouterr().out
    assert "--cpus-per-predictor" in shown and "--calls-per-predictor" in shown
    assert "--predictor-cpus" not in shown and "--predictor-concurrency" not in shown
    assert "{auto,gpu,cpu}" in shown
