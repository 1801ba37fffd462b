"""The deployment files under deploy/, loaded and walked for the tests that check them
(tests/test_deploy_*.py): manifests by kind, the commands their containers run, the jobs'
own parsers and the Dockerfile."""

from __future__ import annotations

import argparse
import copy
import functools
import posixpath
import re
import shlex
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from pipeline.cli import registry

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
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
