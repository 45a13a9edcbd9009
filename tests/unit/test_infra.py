"""infra/: rendered RayJobs carry the job's identity, resources and entrypoint; static manifests parse and hold together;
the AWS cluster YAML passes Ray's own cluster-config validation (the check `ray up` runs)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from laren.jobs import entrypoints
from laren.config import ConfigError
from laren.render import (CREDENTIAL_KEYS, JOBS_DIR, PROJECT_DIR, K8sOptions, command_for, dns1123, render_k8s_file,
                          to_yaml)
from laren.specs import ENTRY, load_job

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

ELASTIC_GPU_JOB = """\
name: face64x
kind: train
model:
  lr_size: 16
resources:
  num_workers: 2
  min_workers: 1
  use_gpu: true
  cpus_per_worker: 8
  gpu_type: H100
"""

CPU_JOB = """\
name: tiny-smoke-v2
train:
  batch_size_global: 12
resources:
  num_workers: 3
  cpus_per_worker: 0.5
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def _pods(rayjob_or_cluster_spec: dict) -> list[dict]:
    """Every pod template spec of a RayCluster spec (head first)."""
    s = rayjob_or_cluster_spec
    return [s["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in s["workerGroupSpecs"]]


def _check_pod_templates(cluster_spec: dict) -> None:
    """What the KubeRay CRD and the API server insist on, checked without a cluster."""
    assert cluster_spec["rayVersion"] == "2.60.0"
    for params in [cluster_spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in cluster_spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values()), f"rayStartParams values must be strings: {params}"
    for g in cluster_spec["workerGroupSpecs"]:
        assert DNS1123.match(g["groupName"])
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for pod in _pods(cluster_spec):
        c = pod["containers"][0]
        assert c["name"] and c["image"]
        res = c["resources"]
        # Extended resources (GPUs) must have request == limit.
        if "nvidia.com/gpu" in res.get("limits", {}):
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in pod.get("volumes", [])}, "every volumeMount needs a volume"


# ------------------------------------------------------------------------------------------------ render k8s


def test_rayjob_carries_identity_resources_and_entrypoint(tmp_path):
    path = _write(tmp_path, "face64x.yaml", ELASTIC_GPU_JOB)
    job = load_job(path)
    run_id = job.run_id
    docs = render_k8s_file(path, K8sOptions(image="reg.example/laren:9-gpu", namespace="ml"))
    docs = list(yaml.safe_load_all(to_yaml(docs)))  # what kubectl reads
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    cm, rj = docs

    # Identity: the RayJob name is the run id as a DNS-1123 name; the Ray submission id is the run id itself.
    assert rj["apiVersion"] == "ray.io/v1"
    assert rj["metadata"]["name"] == run_id.lower() and DNS1123.match(rj["metadata"]["name"])
    assert rj["metadata"]["namespace"] == "ml" and cm["metadata"]["namespace"] == "ml"
    spec = rj["spec"]
    assert spec["jobId"] == run_id
    assert spec["backoffLimit"] == 2 and spec["shutdownAfterJobFinishes"] is True

    # Entrypoint: `laren train jobs/<file>` in the project dir, where the ConfigMap is mounted as jobs/.
    assert spec["entrypoint"] == f"cd {PROJECT_DIR} && laren train jobs/face64x.yaml"
    assert JOBS_DIR == f"{PROJECT_DIR}/jobs"
    assert cm["data"] == {"face64x.yaml": ELASTIC_GPU_JOB}
    # The carried file is the same job: it loads to the same run id in the pod.
    assert load_job(_write(tmp_path / "..", "pod-copy-face64x.yaml", cm["data"]["face64x.yaml"])).run_id == run_id

    # Resources: one GPU worker per pod, elastic 1..2 with the in-tree autoscaler.
    cs = spec["rayClusterSpec"]
    _check_pod_templates(cs)
    assert cs["enableInTreeAutoscaling"] is True
    (g,) = cs["workerGroupSpecs"]
    assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (2, 1, 2)
    # Ray's accelerator_type resource: the autoscaler knows which group serves Ray Train's accelerator_type.
    assert g["rayStartParams"] == {"num-cpus": "8", "num-gpus": "1", "resources": '"{\\"accelerator_type:H100\\": 1}"'}
    w = g["template"]["spec"]
    c = w["containers"][0]
    assert c["image"] == "reg.example/laren:9-gpu"
    assert c["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1}
    assert w["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}  # the label NVIDIA's GFD sets
    assert any(t["key"] == "nvidia.com/gpu" for t in w["tolerations"])
    # The head trains nothing.
    head = cs["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    # Every pod mounts the job file and takes its environment by reference.
    for pod in _pods(cs):
        ct = pod["containers"][0]
        assert {"name": "laren-jobs", "mountPath": JOBS_DIR, "readOnly": True} in ct["volumeMounts"]
        assert ct["envFrom"] == [{"configMapRef": {"name": "laren-env"}}]
        assert _secret_refs(ct) == {k: "laren-credentials" for k in CREDENTIAL_KEYS}
        assert any(v.get("configMap", {}).get("name") == cm["metadata"]["name"] for v in pod["volumes"])


def test_fixed_cpu_job_and_name_sanitising(tmp_path):
    path = _write(tmp_path, "tiny.yaml", CPU_JOB)
    run_id = load_job(path).run_id
    assert run_id.startswith("tiny-smoke-v2-")
    rj = _by_kind(render_k8s_file(path))["RayJob"]
    name = rj["metadata"]["name"]
    assert DNS1123.match(name) and name == "tiny-smoke-v2-" + run_id.rsplit("-", 1)[1]
    assert rj["spec"]["jobId"] == run_id  # Ray submission ids keep the exact run id
    cs = rj["spec"]["rayClusterSpec"]
    _check_pod_templates(cs)
    (g,) = cs["workerGroupSpecs"]
    assert g["groupName"] == "cpu-workers"
    assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (3, 3, 3)
    assert cs["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cs
    c = g["template"]["spec"]["containers"][0]
    # 0.5 CPU per worker: Ray needs a whole CPU to start a worker; the pod asks for exactly that.
    assert g["rayStartParams"] == {"num-cpus": "1", "num-gpus": "0"}
    assert c["resources"]["limits"] == {"cpu": "1", "memory": "32Gi"}
    assert "nodeSelector" not in g["template"]["spec"] and "tolerations" not in g["template"]["spec"]


def test_render_is_deterministic_and_follows_the_config(tmp_path):
    a = to_yaml(render_k8s_file(_write(tmp_path, "face64x.yaml", ELASTIC_GPU_JOB)))
    assert a == to_yaml(render_k8s_file(tmp_path / "face64x.yaml"))
    # Resources are part of the run config: more workers is a different run (and RayJob).
    b = render_k8s_file(_write(tmp_path, "face64x.yaml", ELASTIC_GPU_JOB.replace("min_workers: 1", "min_workers: 2")))
    rj_a = _by_kind(list(yaml.safe_load_all(a)))["RayJob"]
    rj_b = _by_kind(b)["RayJob"]
    assert rj_a["metadata"]["name"] != rj_b["metadata"]["name"]
    assert rj_b["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] == 2


def test_rendered_files_hold_no_credentials(tmp_path, monkeypatch):
    secrets = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-KEY-value", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID",
               "MLFLOW_TRACKING_PASSWORD": "mlflow-pa55word"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LAREN_STORAGE", "s3://private-bucket/x")
    text = to_yaml(render_k8s_file(_write(tmp_path, "face64x.yaml", ELASTIC_GPU_JOB)))
    for v in list(secrets.values()) + ["private-bucket"]:
        assert v not in text
    docs = list(yaml.safe_load_all(text))
    for pod in _pods(_by_kind(docs)["RayJob"]["spec"]["rayClusterSpec"]):  # head and workers
        ct = pod["containers"][0]
        assert all(set(e) == {"name", "valueFrom"} for e in ct["env"]), "environment only by reference"
        assert _secret_refs(ct) == {k: "laren-credentials" for k in CREDENTIAL_KEYS}
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(_secret_refs(ct))


def _secret_refs(container: dict) -> dict[str, str]:
    """{variable: Secret name} of a container's env[].valueFrom.secretKeyRef entries (key = variable name)."""
    out = {}
    for e in container.get("env", []):
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["key"] == e["name"] and ref["optional"] is True
        out[e["name"]] = ref["name"]
    return out


def test_kinds_run_the_submit_commands_and_eval_carries_its_train_job(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    grid = _write(jobs, "abl.yaml", "kind: grid\nvariants:\n  - name: base\n    overrides: {model.latent_space: w}\n")
    g = _by_kind(render_k8s_file(grid))
    assert g["RayJob"]["spec"]["entrypoint"] == f"cd {PROJECT_DIR} && laren {command_for('grid')} jobs/abl.yaml"
    assert g["RayJob"]["spec"]["jobId"] == load_job(grid).run_id
    # the commands `laren submit` runs (one table for both)
    assert [command_for(k) for k in ("train", "eval", "grid", "prior")] == ["train", "run-eval", "run-grid", "prior train"]
    assert entrypoints.ENTRY is ENTRY

    _write(jobs, "face64x.yaml", ELASTIC_GPU_JOB)
    ev = _write(jobs, "eval-face64x.yaml", "kind: eval\ncheckpoint: jobs/face64x.yaml\n")
    e = _by_kind(render_k8s_file(ev))
    assert e["RayJob"]["spec"]["entrypoint"] == f"cd {PROJECT_DIR} && laren {command_for('eval')} jobs/eval-face64x.yaml"
    # The train job the eval job names travels beside it, so `checkpoint: jobs/face64x.yaml` resolves in the pod.
    assert e["ConfigMap"]["data"]["face64x.yaml"] == ELASTIC_GPU_JOB
    missing = _write(jobs, "eval-x.yaml", "kind: eval\ncheckpoint: jobs/nope.yaml\n")
    with pytest.raises(ConfigError, match="checkpoint: jobs/nope.yaml not found"):
        render_k8s_file(missing)


def test_local_paths_are_warned_about(tmp_path):
    p = _write(tmp_path, "w.yaml", "name: w\ndata:\n  train_url: ./.laren/storage/datasets/x\n"
                                   "model:\n  prior:\n    path: s3://b/priors/p\n")
    warnings: list[str] = []
    render_k8s_file(p, warn=warnings.append)
    assert len(warnings) == 1 and "data.train_url" in warnings[0] and "./.laren/storage/datasets/x" in warnings[0]


def test_local_storage_root_is_a_user_error(tmp_path):
    bad = _write(tmp_path, "bad.yaml", "name: bad\nstorage:\n  root: ./.laren/storage\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: storage\.root"):
        render_k8s_file(bad)
    ok = _write(tmp_path, "ok.yaml", "name: ok\nstorage:\n  root: s3://bucket/laren\n")
    assert _by_kind(render_k8s_file(ok))["RayJob"]["metadata"]["name"].startswith("ok-")
    typo = _write(tmp_path, "typo.yaml", "name: t\nresources:\n  num_worker: 2\n")
    with pytest.raises(ConfigError, match=r"resources\.num_worker"):
        render_k8s_file(typo)


@pytest.mark.parametrize(
    "raw, want",
    [("face64x-1a2b3c4d", "face64x-1a2b3c4d"), ("Cat_16x.v2-0f0f0f0f", "cat-16x-v2-0f0f0f0f"), ("--a--b--", "a-b")],
)
def test_dns1123(raw, want):
    assert dns1123(raw) == want


def test_dns1123_long_name_keeps_the_hash():
    name = dns1123("a-very-long-ablation-job-name-" + "x" * 80 + "-deadbeef")
    assert len(name) <= 63 and DNS1123.match(name) and name.endswith("-deadbeef")
    with pytest.raises(ValueError):
        dns1123("___")


def test_cli_render_k8s(tmp_path):
    from laren.cli import main

    path = _write(tmp_path, "face64x.yaml", ELASTIC_GPU_JOB)
    r = CliRunner().invoke(main, ["render", "k8s", str(path), "--image", "x/laren:1", "-n", "team",
                                  "--gpu-label-key", "cloud.google.com/gke-accelerator",
                                  "--gpu-label-value", "nvidia-h100-80gb", "--retries", "5"])
    assert r.exit_code == 0, r.output
    rj = _by_kind(list(yaml.safe_load_all(r.output)))["RayJob"]
    assert rj["metadata"]["namespace"] == "team" and rj["spec"]["backoffLimit"] == 5
    w = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert w["containers"][0]["image"] == "x/laren:1"
    assert w["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    out = tmp_path / "rj.yaml"
    r = CliRunner().invoke(main, ["render", "k8s", str(path), "-o", str(out)])
    assert r.exit_code == 0 and _by_kind(list(yaml.safe_load_all(out.read_text())))["RayJob"]
    r = CliRunner().invoke(main, ["render", "k8s", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "not found" in r.output


# ------------------------------------------------------------------------------------------------ KubeRay CRD schema

RAYJOB_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # DNS-1035 label (KubeRay validateRayJobMetadata)


def _strict(schema):
    """The CRD schema with unknown fields refused where it lists its fields (kubectl --validate=strict), so a
    misspelt or misplaced key fails the test instead of being pruned by the API server."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    return [_strict(v) for v in schema] if isinstance(schema, list) else schema


@pytest.fixture(scope="module")
def rayjob_schema():
    """KubeRay v1.7.0's RayJob openAPIV3Schema (tests/fixtures/kuberay/README.md)."""
    return _strict(json.loads((REPO / "tests" / "fixtures" / "kuberay" / "ray.io_rayjobs.v1.schema.json").read_text()))


def test_rendered_and_static_manifests_satisfy_the_kuberay_crd(tmp_path, rayjob_schema):
    import jsonschema

    rayjobs = [_by_kind(render_k8s_file(_write(tmp_path, f, t)))["RayJob"]
               for f, t in (("face64x.yaml", ELASTIC_GPU_JOB), ("tiny.yaml", CPU_JOB))]
    rayjobs.append(_by_kind(list(yaml.safe_load_all((INFRA / "k8s" / "rayjob.example.yaml").read_text())))["RayJob"])
    # The schema is checked once; jsonschema.validate would check the 220 kB schema again at every call.
    cls = jsonschema.validators.validator_for(rayjob_schema)
    cls.check_schema(rayjob_schema)
    job = cls(rayjob_schema)
    for rj in rayjobs:
        job.validate(json.loads(json.dumps(rj)))
        assert RAYJOB_NAME.match(rj["metadata"]["name"]) and len(rj["metadata"]["name"]) <= 47
    (rc,) = list(yaml.safe_load_all((INFRA / "k8s" / "raycluster.yaml").read_text()))
    cls(rayjob_schema["properties"]["spec"]["properties"]["rayClusterSpec"]).validate(rc["spec"])
    bad = copy.deepcopy(rayjobs[0])
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParam"] = {}  # a misspelt key is caught
    with pytest.raises(jsonschema.ValidationError):
        job.validate(bad)


def test_rayjob_names_start_with_a_letter_and_fit_kuberay(tmp_path):
    for name in ("a-very-long-ablation-job-name-for-the-sixty-four-times-face-prior", "x"):
        rj = _by_kind(render_k8s_file(_write(tmp_path, "j.yaml", f"name: {name}\n")))["RayJob"]
        n = rj["metadata"]["name"]
        assert RAYJOB_NAME.match(n) and len(n) <= 47 and n.endswith(rj["spec"]["jobId"].rsplit("-", 1)[1]), n


def test_unknown_gpu_type_gets_no_made_up_label(tmp_path):
    rj = _by_kind(render_k8s_file(_write(tmp_path, "g.yaml", ELASTIC_GPU_JOB.replace("H100", "MI300X"))))["RayJob"]
    assert "nodeSelector" not in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def test_render_refuses_worker_counts_that_cannot_train(tmp_path):
    with pytest.raises(ConfigError, match="resources.min_workers"):
        render_k8s_file(_write(tmp_path, "e.yaml", ELASTIC_GPU_JOB.replace("num_workers: 2", "num_workers: 8")))


# ------------------------------------------------------------------------------------------------ static manifests


def test_rayjob_example_is_what_the_renderer_writes(tmp_path):
    """infra/k8s/rayjob.example.yaml must stay the renderer's output for the job file it carries (run id aside)."""
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "rayjob.example.yaml").read_text()))
    ex = _by_kind(docs)
    (fname, text), = ex["ConfigMap"]["data"].items()
    image = ex["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    fresh = _by_kind(render_k8s_file(_write(tmp_path, fname, text), K8sOptions(image=image)))

    def norm(d: dict, run_id: str) -> str:
        return json.dumps(d, sort_keys=True).replace(run_id, "<run-id>").replace(dns1123(run_id), "<run-id>")

    for kind in ("ConfigMap", "RayJob"):
        assert norm(ex[kind], ex["RayJob"]["spec"]["jobId"]) == norm(fresh[kind], fresh["RayJob"]["spec"]["jobId"]), (
            f"{kind} in infra/k8s/rayjob.example.yaml is stale: regenerate it with `laren render k8s`")


def test_raycluster_manifest():
    (rc,) = list(yaml.safe_load_all((INFRA / "k8s" / "raycluster.yaml").read_text()))
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    spec = rc["spec"]
    _check_pod_templates(spec)
    (g,) = spec["workerGroupSpecs"]
    assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["enableInTreeAutoscaling"] is True and g["maxReplicas"] > g["minReplicas"]
    for pod in _pods(spec):
        assert _secret_refs(pod["containers"][0]) == {k: "laren-credentials" for k in CREDENTIAL_KEYS}


def test_laren_env_configmap_holds_addresses_only():
    (cm,) = list(yaml.safe_load_all((INFRA / "k8s" / "laren-env.example.yaml").read_text()))
    assert (cm["kind"], cm["metadata"]["name"]) == ("ConfigMap", K8sOptions().env_configmap)
    assert {"LAREN_STORAGE", "MLFLOW_TRACKING_URI"} <= set(cm["data"])
    assert cm["data"]["LAREN_STORAGE"].startswith("s3://")
    assert not any(("SECRET" in k or "PASSWORD" in k or "ACCESS_KEY" in k) for k in cm["data"])


# ------------------------------------------------------------------------------------------------ AWS


def _aws_config() -> dict:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def test_aws_cluster_yaml_passes_ray_validation():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _aws_config()
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs before touching AWS

    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"]["GPU"] == 0
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    assert all(v["resources"]["GPU"] >= 1 for v in workers.values())
    assert any(v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for v in workers.values())
    assert all(v["node_config"]["IamInstanceProfile"]["Name"] for v in types.values()), "S3 through an instance profile"
    assert raw["docker"]["image"].endswith("laren:0.1.0-gpu")
    # Instance sizes as AWS sells them (vCPUs, GPUs), so Ray can place every GPU's worker and its CPUs.
    sizes = {"p5.48xlarge": (192, 8), "g5.2xlarge": (8, 1), "m6i.2xlarge": (8, 0)}
    for name, t in types.items():
        assert (t["resources"]["CPU"], t["resources"]["GPU"]) == sizes[t["node_config"]["InstanceType"]], name
    assert "," not in raw["provider"]["availability_zone"]  # one zone
    # The head launches workers: its profile's role has the autoscaler's EC2 rights and may pass the workers' role.
    head_profile = types[raw["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    assert head_profile != types["gpu-spot"]["node_config"]["IamInstanceProfile"]["Name"]
    pol = json.loads((INFRA / "aws" / "head-ec2-policy.json").read_text())
    actions = {a for st in pol["Statement"] for a in st["Action"]}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags", "iam:PassRole"} <= actions


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["available_node_types"]["head"].update(node_confg={}),  # typo
        lambda c: c.update(head_node_type="nope"),
        lambda c: c["available_node_types"]["gpu-spot"].update(min_workers=99),  # sum(min) > max_workers
    ],
)
def test_ray_validation_rejects_broken_variants(breakage):
    """The validation above has teeth: small mistakes in the same file are refused."""
    pytest.importorskip("jsonschema")
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _aws_config()
    breakage(raw)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        validate_config(prepare_config(raw))


def test_s3_policy_is_scoped_json():
    pol = json.loads((INFRA / "aws" / "s3-policy.json").read_text())
    resources = [r for s in pol["Statement"] for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])]
    assert resources and all(r.startswith("arn:aws:s3:::") and r != "arn:aws:s3:::*" for r in resources)


# ------------------------------------------------------------------------------------------------ image


def test_dockerfile_pins_and_installs_without_dev_extras():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:2\.60\.0-py311-(gpu|cu12\d)$", text, re.M)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    assert "https://download.pytorch.org/whl/cu12" in text and "TORCH_VERSION=2.13.0" in text
    runs = " ".join(re.findall(r"^RUN (.+?)(?<!\\)$", text.replace("\\\n", " "), re.M | re.S))
    assert "pip install -c constraints.txt ." in runs
    # Everything `make setup` installs, from the same constraints (the dev extras aside).
    make = (REPO / "Makefile").read_text()
    setup = [a for a in re.findall(r"pip install -q (.+?) >", make) if a != "--upgrade pip"]
    wanted = ["pip install " + a.replace(" -e '.[dev]'", " .") for a in setup]
    assert setup and all(w in runs for w in wanted), wanted
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX_URL\}" -c constraints.txt', runs)
    assert "[dev]" not in text and "pip install torchvision" not in text
    # Job drivers start in the project dir, where rendered RayJobs mount jobs/.
    assert re.findall(r"^WORKDIR (\S+)$", text, re.M)[-1] == PROJECT_DIR
    assert (REPO / "constraints.txt").read_text().count("torch==2.13.0") == 1


# ------------------------------------------------------------------------------------------------ MLflow server


def test_mlflow_k8s_deployment():
    docs = list(yaml.safe_load_all((INFRA / "mlflow" / "k8s.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert {"Deployment", "Service", "StatefulSet", "ConfigMap"} <= set(kinds)
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert args[0] == "server" and "--serve-artifacts" in args and "--app-name=basic-auth" in args
    backend = next(a for a in args if a.startswith("--backend-store-uri="))
    assert backend.startswith("--backend-store-uri=postgresql://") and ":" not in backend.split("//")[1].split("@")[0]
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    for k in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[k] and env[k]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-secrets"
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["port"] == 5000


def test_mlflow_basic_auth_ini_is_read_by_mlflow(monkeypatch):
    """MLflow's own reader takes the ini; the admin password comes only from the environment (a Secret)."""
    import importlib.util

    # The config reader alone (the auth package's __init__ needs Flask-WTF, a server-side extra: mlflow[auth]).
    spec = importlib.util.spec_from_file_location(
        "mlflow_auth_config", Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "auth" / "config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    read_auth_config = mod.read_auth_config

    for ini, host in (("basic_auth.ini", "mlflow-postgres"), ("compose-basic_auth.ini", "postgres")):
        monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(INFRA / "mlflow" / ini))
        monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
        monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
        cfg = read_auth_config()
        assert cfg.admin_password is None and cfg.admin_username == "admin"
        assert cfg.database_uri == f"postgresql://mlflow@{host}:5432/mlflow_auth"
        monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-secret")
        assert read_auth_config().admin_password == "from-secret"
    sql = (INFRA / "mlflow" / "initdb" / "10-auth-db.sql").read_text()
    assert "CREATE DATABASE mlflow_auth" in sql


def test_mlflow_docker_compose():
    d = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    assert {"mlflow", "postgres", "s3"} <= set(d["services"])
    m = d["services"]["mlflow"]
    assert "--serve-artifacts" in m["command"] and "--app-name=basic-auth" in m["command"]
    assert m["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # Every secret is interpolated from the untracked .env, never written here.
    for svc in d["services"].values():
        for k, v in (svc.get("environment") or {}).items():
            if any(s in k for s in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                assert str(v).startswith("${"), f"{k} must come from .env"
    assert ".env" in (INFRA / ".gitignore").read_text().split()
