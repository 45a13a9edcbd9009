"""Training state on disk: a checkpoint directory of safetensors + JSON (architecture rule 8: no pickled code).

A checkpoint directory holds

    weights.safetensors   model.<key> (the full LarenSR state dict, frozen generator included, so a checkpoint is
                          self-contained for `laren upscale` / `laren eval`) and disc.<key> (the discriminator)
    optim.safetensors     <optimizer>/<param index>/<state key> (Adam exp_avg, exp_avg_sq, step)
    state.json            step, images seen, kimg, data position, per-rank RNG states, MLflow run id, optimizer
                          hyper-parameters, the resolved run config, and the sha256 of the two tensor files

Writes are atomic: every file goes to a temporary name in the same directory and is renamed into place, and
``state.json`` (which carries the checksums of the others) is renamed last, so it is the commit marker: a directory
without a valid ``state.json`` or whose checksums disagree is an incomplete checkpoint and is refused on load.
:func:`write_checkpoint_dir` additionally builds the whole directory under a temporary name and renames it.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from laren.data import storage
from laren.models.state_dict import load_strict
from laren.redact import redact

FORMAT = "laren-checkpoint/1"
WEIGHTS_FILE = "weights.safetensors"
OPTIM_FILE = "optim.safetensors"
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match the model."""


@dataclass
class TrainState:
    """Where a run is: counted in optimizer steps and images (kimg = images_seen / 1000).

    ``data_epoch`` / ``data_batch`` / ``data_ranks`` are the data position: the pass over the training stream, the
    batches of that pass already consumed, and per rank where each of its loader workers is in the pass
    (``TrainLoader.position()``, format in laren.data.pipeline): the loader seeks there on resume. Checkpoints from
    before ``data_ranks`` was saved load with it empty (the consumed batches are then replayed).
    """

    step: int = 0
    images_seen: int = 0
    data_epoch: int = 0
    data_batch: int = 0
    data_ranks: list[dict[str, Any]] = field(default_factory=list)  # one entry per rank
    mlflow_run_id: Optional[str] = None
    worker_s: float = 0.0  # workers x wall seconds of training, summed over attempts, to the last log step (laren.cost)
    rng: list[dict[str, Any]] = field(default_factory=list)  # one entry per rank, see capture_rng()

    @property
    def kimg(self) -> float:
        return self.images_seen / 1000.0

    def advance(self, batch_size_global: int) -> None:
        """One optimizer step of ``batch_size_global`` images done."""
        self.step += 1
        self.images_seen = self.step * batch_size_global


# ----------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA, numpy, python) as JSON-ready values."""
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        states = [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# ----------------------------------------------------------------------------------------------- optimizer <-> tensors


def optimizer_to_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into safetensors-ready tensors and JSON-ready rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}/{idx}/{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(
    name: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Load what :func:`optimizer_to_tensors` wrote into ``opt`` (same parameter order)."""
    state: dict[int, dict[str, Any]] = {}
    prefix = f"{name}/"
    for key, v in tensors.items():
        if not key.startswith(prefix):
            continue
        idx, k = key[len(prefix):].split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    n_own = sum(len(g["params"]) for g in opt.param_groups)
    n_ck = sum(len(g["params"]) for g in groups)
    if n_own != n_ck:
        raise CheckpointError(f"optimizer {name!r}: checkpoint has {n_ck} parameters, the model has {n_own}")
    opt.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------------------------- files


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path`` (:func:`laren.data.storage.atomic_local_file`)."""
    with storage.atomic_local_file(path) as tmp:
        write(tmp)


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    disc: Optional[torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: TrainState,
    config: Optional[dict[str, Any]] = None,
) -> Path:
    """Write a checkpoint into ``directory`` (created if needed); ``state.json`` last, as the commit marker."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / STATE_FILE).unlink(missing_ok=True)  # an old marker must not vouch for new files
    weights = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if disc is not None:
        weights.update({f"disc.{k}": v.detach().cpu().contiguous().clone() for k, v in disc.state_dict().items()})
    optim_tensors: dict[str, torch.Tensor] = {}
    optim_meta: dict[str, Any] = {}
    for name, opt in optimizers.items():
        t, m = optimizer_to_tensors(name, opt)
        optim_tensors.update(t)
        optim_meta[name] = m
    _atomic_write(d / WEIGHTS_FILE, lambda p: save_file(weights, p, metadata={"format": FORMAT}))
    _atomic_write(d / OPTIM_FILE, lambda p: save_file(optim_tensors, p, metadata={"format": FORMAT}))
    if config is not None:  # a checkpoint travels (MLflow artifact, storage): no passwords in URLs, no keys
        config = redact(config)
    doc = {
        "format": FORMAT,
        **asdict(state),
        "kimg": state.kimg,
        "optimizers": optim_meta,
        "config": config,
        "sha256": {name: storage.sha256_file(d / name) for name in (WEIGHTS_FILE, OPTIM_FILE)},
    }
    _atomic_write(d / STATE_FILE, lambda p: Path(p).write_text(json.dumps(doc, indent=1)))
    return d


def write_checkpoint_dir(final_dir: str | os.PathLike, *args, **kwargs) -> Path:
    """:func:`save_checkpoint` into a sibling temporary directory, then rename it to ``final_dir`` (replacing it)."""
    final = Path(final_dir)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as err:
        raise _unwritable(final, err) from err
    try:
        save_checkpoint(tmp, *args, **kwargs)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unwritable(final, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (permissions, a full disk); the previous checkpoints are untouched."""


def _unwritable(final: Path, err: OSError) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"cannot write checkpoint {final}: {err.strerror or err} ({final.parent} is not writable or full). Fix its "
        "permissions or free space, or point storage.root elsewhere, then re-run the job: it resumes from the last "
        "complete checkpoint, which is left untouched."
    )


def read_state(directory: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The parsed ``state.json`` of a complete checkpoint. With ``verify``, its sha256 map must name exactly the
    tensor files, and the folder must hold exactly those files (plus ``state.json``), each matching its checksum."""
    d = Path(directory)
    sp = d / STATE_FILE
    if not sp.is_file():
        raise CheckpointError(f"{d}: not a complete laren checkpoint ({STATE_FILE} missing)")
    try:
        doc = json.loads(sp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{sp}: not valid JSON ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise CheckpointError(f"{sp}: unknown checkpoint format {fmt!r} (expected {FORMAT})")
    if verify:
        sums = doc.get("sha256")
        expected = {WEIGHTS_FILE, OPTIM_FILE}
        if not isinstance(sums, dict) or set(sums) != expected:
            named = sorted(map(str, sums)) if isinstance(sums, dict) else sums
            raise CheckpointError(f"{sp}: the sha256 map must name exactly {sorted(expected)}, it names {named}")
        present = {p.name for p in d.iterdir()} - {STATE_FILE}
        for name in sorted(present - expected):
            raise CheckpointError(f"{d / name}: not part of the checkpoint (not in the sha256 map of {STATE_FILE})")
        for name in sorted(expected):
            f = d / name
            if f.is_symlink() or not f.is_file():
                raise CheckpointError(f"{f}: missing or not a regular file (listed in {STATE_FILE})")
            if storage.sha256_file(f) != sums[name]:
                raise CheckpointError(f"{f}: does not match the checksum in {STATE_FILE}")
    return doc


def train_state_from_doc(doc: dict[str, Any]) -> TrainState:
    return TrainState(**{k: doc[k] for k in TrainState.__dataclass_fields__ if k in doc})


def load_prefixed(module: torch.nn.Module, weights: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Load the ``prefix``-ed entries of ``weights`` (``model.``, ``disc.``) strictly into ``module``."""
    sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    load_strict(module, sub, f"{source}: {prefix[:-1]} weights do not match the model built from the config",
                error=CheckpointError)


def load_weights(directory: str | os.PathLike, model: torch.nn.Module, disc: Optional[torch.nn.Module] = None) -> None:
    """Load model (and discriminator) weights from a checkpoint directory."""
    d = Path(directory)
    read_state(d)
    weights = load_file(str(d / WEIGHTS_FILE))
    load_prefixed(model, weights, "model.", str(d / WEIGHTS_FILE))
    if disc is not None:
        load_prefixed(disc, weights, "disc.", str(d / WEIGHTS_FILE))


def load_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    disc: Optional[torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> TrainState:
    """Load everything :func:`save_checkpoint` wrote; returns the TrainState (RNG is restored by the caller)."""
    d = Path(directory)
    doc = read_state(d)
    load_weights(d, model, disc)
    optim_tensors = load_file(str(d / OPTIM_FILE))
    for name, opt in optimizers.items():
        if name not in doc["optimizers"]:
            raise CheckpointError(f"{d}: no state for optimizer {name!r}")
        optimizer_from_tensors(name, opt, optim_tensors, doc["optimizers"][name])
    return train_state_from_doc(doc)


def fetch_checkpoint(url: str, dest: str | os.PathLike) -> Path:
    """A checkpoint directory at a local path or s3:// URL as a local directory (downloaded into ``dest`` if remote)."""
    if "://" not in url or url.startswith("file://"):
        p = Path(url.removeprefix("file://")).expanduser()
        if not (p / STATE_FILE).is_file():
            raise FileNotFoundError(f"checkpoint not found: {p} has no {STATE_FILE} (pass a checkpoint directory)")
        return p
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    base = url.rstrip("/")
    if not storage.exists(storage.join(base, STATE_FILE)):
        raise FileNotFoundError(f"checkpoint not found: {base}/{STATE_FILE} does not exist (pass a checkpoint directory)")
    for name in (WEIGHTS_FILE, OPTIM_FILE, STATE_FILE):
        storage.download_file(storage.join(base, name), str(out / name))
    return out


def checkpoint_names(run_dir: Optional[str]) -> list[str]:
    """Names of the complete checkpoints of a run: the ``checkpoint_*`` folders directly under ``run_dir`` (local
    path or s3://) that hold a ``state.json`` (the commit marker, written last), newest first (the names are
    ``checkpoint_<step:09d>``, so name order is step order)."""
    if not run_dir:
        return []
    base = str(run_dir).rstrip("/")
    rels = [f[len(base):].strip("/").split("/") for f in storage.list_files(base) if f.startswith(base)]
    return sorted({r[0] for r in rels if len(r) == 2 and r[1] == STATE_FILE and r[0].startswith("checkpoint_")},
                  reverse=True)
