"""Validate KubeRay objects against the operator's own CRDs, offline, with unknown fields as errors.

The CRDs in ``tests/data/kuberay-crds/<tag>/`` are ray-project/kuberay's
``helm-chart/kuberay-operator/crds/ray.io_*.yaml`` at that release tag, gzipped (``SOURCE.md``
there lists tags and commits).
A CRD's ``openAPIV3Schema`` is turned into a JSON Schema the way the API server reads it:
- a field not in ``properties`` is unknown (the API server prunes it, or rejects it with
  ``kubectl --validate=strict``, the default since Kubernetes 1.25): here it is an error, unless
  the schema says ``x-kubernetes-preserve-unknown-fields`` or gives ``additionalProperties``;
- ``x-kubernetes-int-or-string`` takes an integer or a string;
- ``metadata`` of the object itself is checked as ObjectMeta's top level (name, labels, ...);
  an embedded object's ``metadata`` as its schema says.
"""

from __future__ import annotations

import copy
import gzip
from functools import cache
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).parents[1] / "data" / "kuberay-crds"
# The KubeRay releases deploy/README.md supports, oldest and newest, per kind.
SUPPORTED = {
    "RayCluster": ("v1.1.0", "v1.7.0"),
    "RayJob": ("v1.1.0", "v1.7.0"),
    "RayCronJob": ("v1.6.0", "v1.7.0"),
}
FILES = {"RayCluster": "ray.io_rayclusters.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz",
         "RayCronJob": "ray.io_raycronjobs.yaml.gz"}
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "finalizers",
               "ownerReferences"}


def strict(schema: dict) -> dict:
    """The JSON Schema of an OpenAPI v3 structural schema, unknown fields forbidden."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("properties", {})
            node.setdefault("additionalProperties", False)
        for key in [k for k in node if k.startswith("x-kubernetes-")]:
            del node[key]
        node.pop("nullable", None)
        for key in ("properties", "patternProperties", "definitions"):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("allOf", "anyOf", "oneOf"):
            walk(node.get(key, []))

    walk(schema)
    return schema


@cache
def validator(kind: str, tag: str) -> jsonschema.Draft7Validator:
    with gzip.open(CRDS / tag / FILES[kind], "rt") as f:
        crd = yaml.safe_load(f)
    assert crd["spec"]["names"]["kind"] == kind, (kind, tag)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    props = schema["properties"]
    props["apiVersion"] = {"const": "ray.io/v1"}
    props["kind"] = {"const": kind}
    props["metadata"] = {"type": "object", "additionalProperties": False,
                         "properties": {k: {} for k in OBJECT_META}}
    return jsonschema.Draft7Validator(schema)


def errors(doc: dict, tag: str) -> list[str]:
    """What the CRD of ``tag`` says is wrong with ``doc`` (empty when it is valid)."""
    found = validator(doc["kind"], tag).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found)
