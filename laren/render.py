"""Render cluster manifests from a job file: a KubeRay RayJob (plus the ConfigMap that carries the job file).

``laren render k8s jobs/face64x.yaml | kubectl apply -f -`` runs the same job file on Kubernetes that ``laren train`` runs
on a laptop. Everything cluster-specific comes from the job's ``resources`` section; nothing secret is ever written:

- identity: ``metadata.name`` is the job's run id (``<job name>-<config hash>``, deterministic; the id ``laren submit``
  uses) made a DNS-1123 name, and ``spec.jobId`` (the Ray submission id) is the run id itself. ``backoffLimit`` retries start a fresh cluster that runs the
  same entrypoint with the same run id, so training resumes from the last checkpoint under ``<storage>/runs/<run id>``.
- the job file travels in a ConfigMap (its text as written, so ``storage.root`` / ``tracking.tracking_uri`` defaults resolve
  from the pod's environment, not the machine that rendered it) mounted at :data:`JOBS_DIR` in every Ray pod; an eval
  job's ``checkpoint: jobs/<train job>.yaml`` travels with it.
- entrypoint: ``cd /home/ray/laren && laren <command> jobs/<file>``, the command per kind as ``laren submit`` runs it
  (``laren.specs.ENTRY``: train -> train, eval -> eval, grid -> the grid runner).
- resources: one worker pod per training worker (``num_workers`` -> replicas / maxReplicas, ``min_workers`` -> minReplicas
  with the in-tree autoscaler on, ``use_gpu`` -> one ``nvidia.com/gpu`` per pod, ``cpus_per_worker`` -> CPU request and
  Ray's ``num-cpus``, ``gpu_type`` -> a nodeSelector on ``gpu_label_key``; Ray itself sees the accelerator type of the
  node's GPU, which Ray Train matches against ``gpu_type``).
- environment: ``LAREN_STORAGE``, ``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL`` … from the ConfigMap ``laren-env``
  (``envFrom``) and the credentials :data:`CREDENTIAL_KEYS` (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``, the AWS keys)
  by name from the Secret ``laren-credentials`` (``env[].valueFrom.secretKeyRef``, optional), which the operator
  creates once per namespace (see infra/k8s/laren-env.example.yaml). The rendered files hold references, never values.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

import yaml

from laren.config import ConfigError
from laren.plan import check_rules
from laren.specs import ENTRY, JobSpec, load_job

RAY_VERSION = "2.60.0"
try:
    _LAREN_VERSION = version("laren")
except PackageNotFoundError:  # running from a source tree that is not installed
    _LAREN_VERSION = "latest"
#: The project directory in the image (infra/docker/Dockerfile WORKDIR); job drivers start here.
PROJECT_DIR = "/home/ray/laren"
#: Where the job file's ConfigMap is mounted in every Ray pod (it shadows the image's own jobs/).
JOBS_DIR = f"{PROJECT_DIR}/jobs"
#: Local-path fields that a pod only has when a shared volume provides them (warned about, not refused).
LOCAL_PATH_FIELDS = ("data.train_url", "data.val_url", "model.prior.path", "loss.vgg16_path", "eval.alexnet_path")
#: ``resources.gpu_type`` (Ray's accelerator type) -> the ``nvidia.com/gpu.product`` label NVIDIA's GPU feature discovery
#: puts on such nodes. A type not listed gets no nodeSelector (give --gpu-label-value): a made-up value matches no node.
GPU_PRODUCT_LABELS = {
    "H100": "NVIDIA-H100-80GB-HBM3", "H200": "NVIDIA-H200", "A100": "NVIDIA-A100-SXM4-80GB", "A10G": "NVIDIA-A10G",
    "L4": "NVIDIA-L4", "L40S": "NVIDIA-L40S", "V100": "Tesla-V100-SXM2-16GB",
}
#: KubeRay's limit on RayJob names (utils.MaxRayJobNameLength: 53 for a RayCluster, minus the 6 characters it appends).
MAX_RAYJOB_NAME = 47
#: The credentials a pod takes from the Secret ``K8sOptions.env_secret``, each by name (``secretKeyRef``; optional: with
#: IAM roles for service accounts the AWS keys are left out, an MLflow server without auth needs no user).
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
#: Label keys laren puts on what it renders (select with ``kubectl get rayjobs -l laren.io/job=face64x``).
LABEL_JOB = "laren.io/job"
LABEL_RUN = "laren.io/run-id"


@dataclass(frozen=True)
class K8sOptions:
    """Cluster-side choices that are not part of a job's config (they do not change the run id)."""

    image: str = f"laren:{_LAREN_VERSION}-gpu"
    namespace: Optional[str] = None
    env_configmap: str = "laren-env"
    env_secret: str = "laren-credentials"
    service_account: Optional[str] = None
    head_cpus: int = 4
    head_memory: str = "16Gi"
    worker_memory: str = "32Gi"
    gpu_label_key: str = "nvidia.com/gpu.product"
    gpu_label_value: Optional[str] = None  # None: resources.gpu_type as written in the job
    backoff_limit: int = 2
    ttl_seconds_after_finished: int = 600
    active_deadline_seconds: Optional[int] = None
    extra_labels: dict[str, str] = field(default_factory=dict)


def dns1123(name: str, max_len: int = 63) -> str:
    """``name`` as a DNS-1123 label: lower-case alphanumerics and '-', starting and ending alphanumeric, <= max_len.

    Characters outside the set become '-', runs of '-' collapse; an over-long name keeps its tail (the config hash) by
    cutting the middle of the job name.
    """
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower())
    s = re.sub(r"-{2,}", "-", s).strip("-")
    if not s:
        raise ValueError(f"{name!r} has no character usable in a Kubernetes name (a-z, 0-9, '-')")
    if len(s) > max_len:
        head, _, tail = s.rpartition("-")
        keep = max_len - len(tail) - 1
        s = (head[:keep].rstrip("-") + "-" + tail) if keep > 0 and tail else s[:max_len]
        s = s.strip("-")
    return s


def rayjob_name(run_id: str) -> str:
    """The RayJob name of a run: a DNS-1035 label of <= 47 characters, as KubeRay requires (job names start with a
    lowercase letter: a config rule), keeping the config hash when the name is cut."""
    return dns1123(run_id, MAX_RAYJOB_NAME)


def _quoted_resources(res: dict[str, float]) -> str:
    """A ``rayStartParams.resources`` value: KubeRay passes it to ``ray start --resources=<value>`` as it is, so the
    JSON travels in double quotes with its own quotes escaped."""
    return '"' + json.dumps(res).replace('"', '\\"') + '"'


def command_for(kind: str) -> str:
    """The laren command that runs a job of ``kind`` (the same one ``laren submit`` uses)."""
    return ENTRY[kind]


def entrypoint(job: JobSpec, file_name: str) -> str:
    """The shell command the Ray job runs on the head pod; relative paths in job files resolve in the project dir."""
    return f"cd {shlex.quote(PROJECT_DIR)} && {shlex.join(['laren', command_for(job.kind), f'jobs/{file_name}'])}"


def _cpu_quantity(cpus: float) -> str:
    """Kubernetes CPU quantity: whole cores as '4', fractions in millicores ('500m')."""
    return str(int(cpus)) if float(cpus).is_integer() else f"{int(round(cpus * 1000))}m"


def _container(name: str, image: str, cpus: float, memory: str, gpus: int, opts: K8sOptions) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": _cpu_quantity(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": dict(limits), "limits": dict(limits)},
        # Addresses (ConfigMap) and credentials (Secret, named keys) by reference only: nothing secret is rendered.
        "envFrom": [{"configMapRef": {"name": opts.env_configmap}}],
        "env": [{"name": k, "valueFrom": {"secretKeyRef": {"name": opts.env_secret, "key": k, "optional": True}}}
                for k in CREDENTIAL_KEYS],
        "volumeMounts": [{"name": "laren-jobs", "mountPath": JOBS_DIR, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _pod_spec(container: dict, configmap: str, opts: K8sOptions, node_selector: dict[str, str], gpu: bool) -> dict:
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": "laren-jobs", "configMap": {"name": configmap}},
            # DataLoader workers share batches through /dev/shm; the container default (64 MiB) is too small.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if node_selector:
        spec["nodeSelector"] = node_selector
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    return spec


def render_k8s(job: JobSpec, job_file: str | Path, job_text: str, opts: K8sOptions = K8sOptions(),
               extra_files: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
    """The manifests that run ``job`` on KubeRay: ``[ConfigMap (the job file), RayJob]``.

    ``job_file`` names the file (its basename is kept in the pod); ``job_text`` is its content, carried verbatim;
    ``extra_files`` (basename -> text) travel beside it (an eval job's train job file).
    """
    run_id = job.run_id
    name = rayjob_name(run_id)
    r = job.resources
    file_name = Path(job_file).name
    if not re.fullmatch(r"[A-Za-z0-9._-]+", file_name):
        raise ConfigError(f"{job_file}: a job file rendered for Kubernetes must be named with letters, digits, '.', '_' "
                          "or '-' only (it becomes a ConfigMap key and part of the entrypoint)")
    configmap = dns1123(f"{name}-job")
    labels = {LABEL_JOB: dns1123(job.name), LABEL_RUN: name, **opts.extra_labels}
    meta = {"name": name, "labels": dict(labels)}
    if opts.namespace:
        meta["namespace"] = opts.namespace

    gpus = 1 if r.use_gpu else 0
    worker_cpus = max(1, math.ceil(r.cpus_per_worker))
    gpu_label = opts.gpu_label_value or GPU_PRODUCT_LABELS.get(r.gpu_type or "")
    node_selector = {opts.gpu_label_key: gpu_label} if (r.use_gpu and gpu_label) else {}
    elastic = r.min_workers is not None and r.min_workers < r.num_workers
    group = "gpu-workers" if r.use_gpu else "cpu-workers"

    worker_params = {"num-cpus": str(worker_cpus), "num-gpus": str(gpus)}
    if r.use_gpu and r.gpu_type:  # the autoscaler learns from this which group serves Ray Train's accelerator_type
        worker_params["resources"] = _quoted_resources({f"accelerator_type:{r.gpu_type}": 1})
    head = _container("ray-head", opts.image, opts.head_cpus, opts.head_memory, 0, opts)
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}]
    worker = _container("ray-worker", opts.image, worker_cpus, opts.worker_memory, gpus, opts)

    cluster_spec: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": elastic,
        "headGroupSpec": {
            # The head runs the driver and the Train controller, never a training worker (no GPU).
            "rayStartParams": {"num-gpus": "0"},
            "template": {"metadata": {"labels": labels}, "spec": _pod_spec(head, configmap, opts, {}, False)},
        },
        "workerGroupSpecs": [
            {
                "groupName": group,
                "replicas": r.num_workers,
                "minReplicas": r.min_workers if r.min_workers is not None else r.num_workers,
                "maxReplicas": r.num_workers,
                # One training worker per pod: Ray sees exactly the CPUs and GPU the worker reserves.
                "rayStartParams": worker_params,
                "template": {"metadata": {"labels": labels},
                             "spec": _pod_spec(worker, configmap, opts, node_selector, bool(gpus))},
            }
        ],
    }
    if elastic:
        cluster_spec["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 300}

    spec: dict[str, Any] = {
        "entrypoint": entrypoint(job, file_name),
        "jobId": run_id,
        "metadata": {"laren_run_id": run_id, "laren_job": job.name, "laren_kind": job.kind},
        "entrypointNumCpus": 1,
        "submissionMode": "K8sJobMode",
        "backoffLimit": opts.backoff_limit,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": opts.ttl_seconds_after_finished,
        "rayClusterSpec": cluster_spec,
    }
    if opts.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = opts.active_deadline_seconds

    cm_meta = {"name": configmap, "labels": labels}
    if opts.namespace:
        cm_meta["namespace"] = opts.namespace
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": cm_meta, "data": {**(extra_files or {}), file_name: job_text}},
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": spec},
    ]


def check_cluster_storage(raw: Any, source: str) -> None:
    """A multi-node cluster needs shared storage: a job file that pins ``storage.root`` to a local path cannot run there.

    Only an explicit value is checked; an absent one resolves from ``LAREN_STORAGE`` in the pod (ConfigMap laren-env).
    """
    root = (raw.get("storage") or {}).get("root") if isinstance(raw, dict) else None
    if root is not None and not str(root).startswith("s3://"):
        raise ConfigError(
            f"{source}: storage.root is {root!r}, a local path, which the workers of a cluster do not share; "
            "remove it (the pods then take LAREN_STORAGE from the ConfigMap laren-env) or set an s3:// URL"
        )


def local_paths(raw: Any) -> list[tuple[str, str]]:
    """``(field path, value)`` of the job file's explicit local paths among :data:`LOCAL_PATH_FIELDS`."""
    out = []
    for dotted in LOCAL_PATH_FIELDS:
        v: Any = raw
        for k in dotted.split("."):
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, str) and v and not v.startswith("s3://"):
            out.append((dotted, v))
    return out


def _checkpoint_job_file(job: JobSpec, path: Path) -> dict[str, str]:
    """An eval job's ``checkpoint: jobs/<train>.yaml``, read so it travels in the ConfigMap (else nothing)."""
    ck = job.checkpoint if job.kind == "eval" else ""
    if not ck.endswith((".yaml", ".yml")):
        return {}
    rel = Path(ck)
    if rel.is_absolute() or rel.parent != Path("jobs"):
        raise ConfigError(f"{path}: checkpoint: {ck} must be a job file under jobs/ (jobs/<name>.yaml) to run on a "
                          "cluster, or a run id / s3:// checkpoint URL")
    for base in (path.resolve().parent.parent, Path.cwd()):
        if (base / rel).is_file():
            return {rel.name: (base / rel).read_text()}
    raise ConfigError(f"{path}: checkpoint: {ck} not found (looked beside the job file's jobs/ folder and in the "
                      "working directory)")


def render_k8s_file(path: str | Path, opts: K8sOptions = K8sOptions(), warn=None) -> list[dict[str, Any]]:
    """Load and validate a job file, check it can run on a cluster, then :func:`render_k8s` it.

    ``warn(message)`` is told about local paths the pods will only have on a shared volume.
    """
    path = Path(path)
    job = load_job(path)
    text = path.read_text()
    raw = yaml.safe_load(text)
    check_cluster_storage(raw, str(path))
    if job.kind in ("train", "grid"):  # cross-field rules (elastic sizes, model combination) before a cluster starts
        for cfg in [job.run_config()] if job.kind == "train" else [c for _, c in job.rows()]:
            try:
                check_rules(cfg)
            except ConfigError as err:
                raise ConfigError(f"invalid config in {path}:\n  {err}") from None
    if warn is not None:
        for dotted, v in local_paths(raw):
            warn(f"{path}: {dotted} is a local path ({v}); the pods see it relative to {PROJECT_DIR} only if a shared "
                 "volume provides it: prefer an s3:// URL")
    return render_k8s(job, path, text, opts, extra_files=_checkpoint_job_file(job, path))


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job file in the ConfigMap) as literal blocks, so the rendered file stays readable;
    no YAML anchors (shared label dicts are written out in full, as kubectl users expect)."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, s: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Documents joined with '---', keys in the order built."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, explicit_start=True)
