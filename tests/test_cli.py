"""The command line: help text, error messages, the README's commands kept in CI."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.cli.main import main
from pipeline.demo.synthetic import write_sample_archive

ROOT = Path(__file__).resolve().parents[1]


def test_job_script_help_lists_the_options():
    out = subprocess.run([sys.executable, "jobs/infer.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--input", "--output", "--weights", "--batch-size", "--num-predictors",
                 "--storage-options", "--format", "ray job submit"):
        assert flag in out


def test_bad_input_gives_a_clear_error(tmp_path, capsys):
    assert main(["infer", "--input", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    assert f"input not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    assert main(["infer", "--input", str(tmp_path / "in"), "--output", str(tmp_path)]) == 2
    assert "no tar shards found" in capsys.readouterr().err


def test_bad_weights_fail_before_any_work(tmp_path, capsys):
    write_sample_archive(str(tmp_path / "in"), 1, 1, image_size=(64, 64))
    (tmp_path / "w.pt").write_bytes(b"not a model")
    code = main(["infer", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--weights", str(tmp_path / "w.pt")])
    assert code == 2
    assert "is not a readable model file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_errors_carry_their_exit_status_and_a_bug_keeps_its_traceback(tmp_path, capsys,
                                                                      monkeypatch):
    """Bad input exits 2 and a job that could not finish exits 1, each in one line; any other
    exception is a bug: it is not swallowed into "error: ..." and exit status 2 (issue 24:
    every ValueError used to be taken for bad input)."""
    import pytest

    from pipeline.config.errors import BadInput, JobFailed
    from pipeline.inference import job

    args = ["infer", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    for raised, code in ((BadInput("the input is wrong"), 2), (JobFailed("a stage failed"), 1)):
        def run(*_, exc=raised):
            raise exc
        monkeypatch.setattr(job, "run_inference", run)
        write_sample_archive(str(tmp_path / "in"), 1, 1, image_size=(32, 32))
        assert main(args) == code
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {raised}"

    def bug(*_):
        raise ValueError("an internal invariant broke")
    monkeypatch.setattr(job, "run_inference", bug)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(args)


def test_cli_job_with_preview(ray_session, weights_file, pushgateway, tmp_path, capsys):
    """The job end to end through the command line, pushing its outcome to a real Pushgateway
    (where none is installed, to a port nothing listens on: the run must not notice)."""
    write_sample_archive(str(tmp_path / "in"), 1, 2, image_size=(96, 96))
    preview = tmp_path / "p.png"
    gateway = pushgateway or f"http://127.0.0.1:{_closed_port()}"
    code = main(["infer", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--weights", weights_file[0], "--preview", str(preview),
                 "--pushgateway", gateway])
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"summary: 2 samples in 1 shards \(0 already done\), 0 errors, .* "
                     r"images/s .* \[OK\]", printed)
    assert pq.read_table(tmp_path / "out" / "part-faces-00000.parquet").num_rows == 2
    assert preview.stat().st_size > 1000 and "meaningless" not in printed
    assert "pushgateway" not in (tmp_path / "out" / "_config.yaml").read_text()
    if pushgateway is not None:
        from support.pushgateway_server import series

        group = (("output", str(tmp_path / "out")),)
        pushed = series(pushgateway, "landmarks_infer")
        run = {name: v for (name, labels), v in pushed.items() if labels == group}
        assert (run["landmarks_last_run_success"], run["landmarks_last_run_rows"],
                run["landmarks_last_run_errors"]) == (1.0, 2.0, 0.0)
        assert 0 < run["landmarks_last_run_duration_seconds"] < 600
        assert abs(run["landmarks_last_run_timestamp_seconds"] - time.time()) < 600
        success = pushed[("landmarks_last_success_timestamp_seconds",
                          (("outcome", "success"),) + group)]
        assert success == run["landmarks_last_run_timestamp_seconds"]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n\s*(.+?)\n\s*```", readme.split("## The two commands")[1])[:2]
    assert len(commands) == 2
    for command in commands:
        assert command.strip() in ci.splitlines()


def _parsers():
    """Every command's parser, mounted whole."""
    import argparse

    from pipeline.cli.registry import COMMANDS, build_parser

    for name in COMMANDS:
        sub = next(a for a in build_parser(name)._actions
                   if isinstance(a, argparse._SubParsersAction)).choices[name]
        yield name, sub


def test_every_option_has_help_that_tells_its_real_default():
    """Help that tells the truth (issue 24): every flag of every command says what it does,
    and a default the help states is the option's default (derived from it, not typed by
    hand where it drifts); nightly has no --preview it would reject."""
    import argparse

    seen = 0
    for name, parser in _parsers():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            seen += 1
            flag = f"{name} {action.option_strings[0]}"
            assert action.help, f"{flag} has no help"
            text = action.help % {"default": action.default} if "%(" in action.help \
                else action.help
            for shown in re.findall(r"\(default ([-0-9.,]+)\)", text):
                assert float(shown.replace(",", "")) == float(action.default), flag
        if name == "nightly":
            assert "--preview" not in parser.format_help()
    assert seen > 100


def test_ranges_are_the_options_own(tmp_path, capsys):
    """A range is declared with its option and checked the same on the command line (a usage
    error, exit 2), in a config file and when the config is built in Python."""
    import pytest

    from pipeline.config.errors import BadInput
    from pipeline.inference.config import InferConfig

    for flag, value, message in (("--batch-size", "0", "must be >= 1, got 0"),
                                 ("--face-threshold", "1", "must be in (0, 1), got 1.0"),
                                 ("--stall-timeout", "0", "must be > 0, got 0.0")):
        with pytest.raises(SystemExit) as usage:
            main(["infer", "--input", "x", "--output", "y", flag, value])
        assert usage.value.code == 2
        assert f"argument {flag}: {message}" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("max_error_fraction: 1.5\n")
    assert main(["infer", "--config", str(config), "--input", "x", "--output", "y"]) == 2
    assert "key 'max_error_fraction' must be in [0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(BadInput, match=r"gpus_per_predictor must be in \(0, 1\], got 2"):
        InferConfig(input="x", output="y", gpus_per_predictor=2)
    # --input without --output: bad arguments, exit 2 like the others (it was 1)
    assert main(["infer", "--input", str(tmp_path)]) == 2
    assert "--output is required with --input" in capsys.readouterr().err
