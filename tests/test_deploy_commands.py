"""The commands in the deployment files and in the READMEs parse with the jobs' own parsers,
and the job configs they mount validate against the jobs: a renamed flag or config key
breaks a test here, not a night."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from support.manifests import (
    AWS_CLUSTER,
    DOCKERFILE,
    JOB_SCRIPTS,
    KUBERAY,
    README,
    REPO,
    check_cluster_spec,
    configmaps,
    job_config_files,
    job_options,
    kuberay_files,
    mounted_files,
    of_kind,
    parse_command,
    rayjob_specs,
)

from pipeline.config.files import ConfigError, check_config

# ---------------------------------------------------------------------------------------------
# Entrypoints parse with the jobs' own parsers


def test_every_kuberay_entrypoint_parses_with_its_jobs_parser():
    seen = set()
    for where, spec, maps in rayjob_specs():
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        files = mounted_files(head, maps)  # the driver runs on the head
        try:
            job, args = parse_command(spec["entrypoint"], files)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
        assert args.config and args.config.endswith(".yaml"), where
        seen.add(job)
    assert seen == {"infer", "finetune", "nightly"}


def test_nightly_entrypoints_take_yesterday():
    for where, spec, maps in rayjob_specs():
        if "nightly" in spec["entrypoint"]:
            head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
            _, args = parse_command(spec["entrypoint"], mounted_files(head, maps))
            assert args.date is None and args.since is None, f"{where}: pinned to a date"


def test_the_parse_helper_catches_broken_entrypoints():
    maps = configmaps(kuberay_files()["rayjob-infer.yaml"])
    rayjob = of_kind(kuberay_files()["rayjob-infer.yaml"], "RayJob")[0]["spec"]
    files = mounted_files(rayjob["rayClusterSpec"]["headGroupSpec"]["template"]["spec"], maps)
    good = rayjob["entrypoint"]
    job, args = parse_command(good, files)
    assert job == "infer" and args.batch_size == 256 and args.device == "gpu"
    broken = {
        "renamed flag": good + " --batch-sise 8",
        "bad value": good + " --device tpu",
        "unknown script": good.replace("jobs/infer.py", "jobs/train.py"),
        "script outside WORKDIR": good.replace("/app/jobs", "/opt/jobs"),
        "config not mounted there": good.replace("/config/infer.yaml", "/etc/infer.yaml"),
    }
    for what, command in broken.items():
        with pytest.raises(AssertionError):
            parse_command(command, files)
            pytest.fail(f"{what} not caught: {command}")
    bad_config = {"/config/infer.yaml": files["/config/infer.yaml"] + "batch_sise: 8\n"}
    with pytest.raises(AssertionError, match="batch_sise"):
        parse_command(good, bad_config)


def test_mounted_config_matches_the_entrypoint_path():
    for where, spec, maps in rayjob_specs():
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        config = shlex.split(spec["entrypoint"])[shlex.split(spec["entrypoint"]).index(
            "--config") + 1]
        assert config in mounted_files(head, maps), f"{where}: {config} is not mounted"


# ---------------------------------------------------------------------------------------------
# Job configs


def test_job_configs_validate_against_their_jobs():
    texts = job_config_files()["texts"]
    assert set(texts) == {"infer", "nightly", "finetune"}
    for job, text in texts.items():
        check_config(job_options(job), yaml.safe_load(text), f"deploy/configs/{job}.yaml")
    with pytest.raises(ConfigError, match="batch_sise"):
        check_config(job_options("infer"), {"batch_sise": 8}, "broken")
    with pytest.raises(ConfigError, match="batch_size"):
        check_config(job_options("infer"), {"batch_size": "many"}, "broken")


def test_configmap_copies_equal_the_config_files():
    texts = job_config_files()["texts"]
    copies = 0
    for name, docs in kuberay_files().items():
        for cm_name, cm in configmaps(docs).items():
            for key, text in cm["data"].items():
                job = key.removesuffix(".yaml")
                if key == "rayjob.yaml":  # the CronJob's RayJob template, not a job config
                    continue
                assert job in texts, f"{name}: ConfigMap {cm_name} key {key}: no deploy/configs"
                assert yaml.safe_load(text) == yaml.safe_load(texts[job]), \
                    f"{name}: ConfigMap {cm_name} differs from deploy/configs/{key}"
                check_config(job_options(job), yaml.safe_load(text), f"{name}: {cm_name}")
                copies += 1
    assert copies == 4  # infer, finetune, nightly (RayCronJob), nightly (CronJob)


def test_configs_agree_with_each_other_and_the_clusters():
    configs = {job: yaml.safe_load(t) for job, t in job_config_files()["texts"].items()}
    # The inference jobs load the model file the fine-tuning job exports.
    assert configs["infer"]["weights"] == configs["finetune"]["export"]
    assert configs["nightly"]["weights"] == configs["finetune"]["export"]
    # One DDP worker per GPU of the fine-tuning RayJob's cluster.
    for where, spec, _ in rayjob_specs():
        if "finetune" in spec["entrypoint"]:
            gpus = check_cluster_spec(where, spec["rayClusterSpec"])
            assert configs["finetune"]["num_workers"] == gpus, where

# ---------------------------------------------------------------------------------------------
# deploy/README.md


def readme_commands(text: str | None = None) -> list[str]:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README.read_text() if text is None else text,
                        flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(shlex.split(line, comments=True)))
    return commands


def job_commands(command: str) -> str | None:
    """The job part of a README command line, or None when it runs no job."""
    tokens = shlex.split(command)
    if tokens[:2] == ["landmarks", "submit"]:
        jobs = set(JOB_SCRIPTS.values())
        at = next(i for i, t in enumerate(tokens) if t in jobs)
        return shlex.join(["landmarks", *tokens[at:]])
    if tokens[:1] == ["landmarks"]:
        return command
    for i, token in enumerate(tokens):
        if token in ("python", "python3") and i + 1 < len(tokens) and "jobs/" in tokens[i + 1]:
            return shlex.join(tokens[i:])
    return None


def test_readme_job_commands_parse_with_their_jobs_parsers():
    files = job_config_files()["files"]
    parsed = 0
    for command in readme_commands():
        job_command = job_commands(command)
        if job_command is None:
            continue
        parse_command(job_command, files)
        parsed += 1
    assert parsed >= 6, parsed


def test_cluster_section_of_the_main_readme_parses():
    """The exact commands of README.md's "Running on a cluster" parse with the jobs' parsers."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Running on a cluster"):]
    section = section[:section.index("\n## ", 1)]
    files = job_config_files()["files"]
    commands = [c for c in map(job_commands, readme_commands(section)) if c is not None]
    jobs = [parse_command(command, files)[0] for command in commands]
    assert {"infer", "finetune", "nightly", "ledger"} <= set(jobs), jobs
    assert len(commands) >= 7, commands


def test_readme_covers_every_deploy_file():
    text = README.read_text()
    for path in sorted(KUBERAY.glob("*.yaml")) + [AWS_CLUSTER, DOCKERFILE]:
        assert str(path.relative_to(REPO)) in text, f"deploy/README.md never names {path.name}"
    for command in readme_commands():
        for token in shlex.split(command):
            if token.startswith("deploy/") and not any(c in token for c in "*<>"):
                assert (REPO / token).exists(), f"deploy/README.md: {token} does not exist"
