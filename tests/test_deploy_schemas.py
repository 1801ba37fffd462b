"""The manifests against the real schemas: KubeRay's CRDs (the oldest and newest supported)
and Kubernetes' own, with unknown fields as errors."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from support import crds
from support.manifests import configmaps, cronjob_rayjob, kuberay_files, of_kind

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
