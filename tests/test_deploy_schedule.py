"""The nightly schedule: a night ends before the next one and before its date changes; the
CronJob's launcher script fixes the night when the schedule fires and ends with the RayJob."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support.manifests import (
    configmaps,
    cronjob_rayjob,
    kuberay_files,
    mounted_files,
    of_kind,
    parse_command,
)


def test_a_night_ends_before_the_next_one_and_before_its_date_changes():
    """No retries for the scheduled RayJobs (a retry restarts activeDeadlineSeconds), and the
    deadline ends the run before the next UTC midnight: it can neither overlap the next night
    nor start after midnight and take the wrong "yesterday"."""
    (cron,) = of_kind(kuberay_files()["raycronjob-nightly.yaml"], "RayCronJob")
    docs = kuberay_files()["cronjob-nightly.yaml"]
    (kube_cron,) = of_kind(docs, "CronJob")
    for where, schedule, spec in (
            ("RayCronJob", cron["spec"]["schedule"], cron["spec"]["jobTemplate"]),
            ("CronJob's RayJob", kube_cron["spec"]["schedule"],
             cronjob_rayjob(kube_cron, configmaps(docs))["spec"])):
        minute, hour = (int(x) for x in schedule.split()[:2])
        attempts = spec.get("backoffLimit", 0) + 1
        assert attempts == 1, f"{where}: a retry's deadline starts over"
        ends = hour * 3600 + minute * 60 + attempts * spec["activeDeadlineSeconds"]
        assert ends < 24 * 3600, f"{where}: can run past midnight UTC"
    assert kube_cron["spec"]["timeZone"] == "Etc/UTC"


# The CronJob's launcher script, run with a stand-in kubectl.

FAKE_KUBECTL = """#!/bin/sh
case "$1" in
  create) cat > "$FAKE/created.yaml"; echo rayjob.ray.io/landmarks-nightly-x7k2p ;;
  get)
    n=$(( $(cat "$FAKE/calls" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$FAKE/calls"
    state=$(sed -n "${n}p" "$FAKE/states"); [ -n "$state" ] || state=$(tail -n 1 "$FAKE/states")
    [ "$state" != ERROR ] || exit 1
    printf '%s' "$state" ;;
  *) exit 2 ;;
esac
"""


def run_launcher(tmp_path: Path, job_name: str, states: list[str]):
    import subprocess

    docs = kuberay_files()["cronjob-nightly.yaml"]
    (cron,) = of_kind(docs, "CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"JOB_NAME": "metadata.labels['job-name']"}  # the Job's name, from its label
    template = tmp_path / "rayjob.yaml"
    template.write_text(configmaps(docs)["landmarks-nightly-rayjob"]["data"]["rayjob.yaml"])
    shell, flag, script = container["command"]
    script = script.replace("/template/rayjob.yaml", str(template))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    (tmp_path / "states").write_text("".join(f"{s}\n" for s in states))
    import os

    done = subprocess.run(["sh", flag, script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                               "FAKE": str(tmp_path), "JOB_NAME": job_name,
                               "POLL_SECONDS": "0"})
    created = tmp_path / "created.yaml"
    return done, (yaml.safe_load(created.read_text()) if created.exists() else None)


def _template_entrypoint() -> str:
    """The RayJob template's entrypoint, as the CronJob's ConfigMap holds it."""
    maps = configmaps(kuberay_files()["cronjob-nightly.yaml"])
    text = maps["landmarks-nightly-rayjob"]["data"]["rayjob.yaml"]
    return yaml.safe_load(text)["spec"]["entrypoint"]


def test_cronjob_launcher_fixes_the_night_when_the_schedule_fires(tmp_path):
    from datetime import datetime, timedelta, timezone

    fired = datetime(2026, 11, 20, 2, 0, tzinfo=timezone.utc)  # long ago: a late (re)start
    done, rayjob = run_launcher(tmp_path, f"landmarks-nightly-{int(fired.timestamp()) // 60}",
                                ["Complete/SUCCEEDED"])
    assert done.returncode == 0, done.stderr
    entrypoint = rayjob["spec"]["entrypoint"]
    assert entrypoint == _template_entrypoint() + " --date 2026-11-19", entrypoint
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    _, args = parse_command(entrypoint, mounted_files(head, configmaps(
        kuberay_files()["cronjob-nightly.yaml"])))
    assert args.date == "2026-11-19"  # the job's own parser takes it
    assert "night 2026-11-19 (schedule fired at 2026-11-20T02:00Z)" in done.stdout

    # A Job started by hand (kubectl create job --from=cronjob/...): the night before now.
    manual = tmp_path / "manual"
    manual.mkdir()
    done, rayjob = run_launcher(manual, "manual-1", ["Complete/SUCCEEDED"])
    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()
    assert done.returncode == 0 and rayjob["spec"]["entrypoint"].endswith(f"--date {yesterday}")


@pytest.mark.parametrize("states, code, said", [
    (["", "Initializing/", "Running/RUNNING", "Complete/SUCCEEDED"], 0, "Complete/SUCCEEDED"),
    (["Initializing/", "ValidationFailed/"], 1, "ValidationFailed/"),
    (["Running/RUNNING", "Failed/FAILED"], 1, "Failed/FAILED"),
    (["Running/RUNNING", "Complete/STOPPED"], 1, "Complete/STOPPED"),
    (["ERROR", "Running/RUNNING", "Complete/SUCCEEDED"], 0, "Complete/SUCCEEDED"),  # a blip
    (["ERROR"], 1, "cannot be read"),  # the RayJob was deleted
])
def test_cronjob_launcher_ends_with_the_rayjob(tmp_path, states, code, said):
    done, _ = run_launcher(tmp_path, "landmarks-nightly-29400000", states)
    assert done.returncode == code, done.stdout + done.stderr
    assert said in done.stdout + done.stderr
