"""Read untrusted checkpoint bytes without running code from them (used by ``laren prior import``).

Two readers, both data-only:

- torch zip files (``torch.save``): ``torch.load(weights_only=True)``; an argparse ``Namespace`` (rosinality training
  checkpoints' ``args``) is admitted through torch's safe-globals mechanism as an inert :class:`Opaque` placeholder.
  TorchScript archives (``constants.pkl`` / ``code/`` entries, which torch would hand to ``torch.jit.load``) and
  compressed entries are refused before torch sees the file.
- plain pickles (NVIDIA stylegan2-ada ``.pkl``): :class:`SafeUnpickler`, a pure-Python unpickler whose ``find_class``
  returns only allow-listed callables or placeholders (never imports), whose BUILD applies only to its own placeholders,
  and which rebuilds tensors from their bytes with its own parser (the storage size is checked against the bytes present
  before anything is allocated; views must lie inside their storage and may not repeat elements).

Whatever the reader, :func:`check_tensors` then walks the result once (each object visited once, depth bounded) and
refuses tensors that are not backed by real bytes of the file (zero-stride or overlapping views) or a total beyond the
file's size. No numpy object is ever reconstructed.
"""

from __future__ import annotations

import codecs
import collections
import io
import pickle
import re
import struct
import zipfile

import torch
from torch import Tensor

MAX_DEPTH = 100  # containers / modules nested deeper than this are refused
MAX_OBJECTS = 1_000_000  # distinct objects in one checkpoint
MAX_NDIM = 8


class UnsafePickleError(ValueError):
    """The file references code that loading would run, or is malformed; nothing from it was executed."""


class Opaque:
    """Inert stand-in for a pickled class (NVIDIA persistent network, torch.nn module, argparse Namespace).

    Keeps the class path and the pickled state; has no behaviour.
    """

    class_path = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.state = args, dict(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = dict(state) if isinstance(state, dict) else {"_state": state}

    def __repr__(self):
        return f"<opaque {self.class_path}>"


_OPAQUE_TYPES: dict[str, type] = {}


def opaque_type(path: str) -> type:
    if path not in _OPAQUE_TYPES:
        _OPAQUE_TYPES[path] = type("Opaque_" + re.sub(r"\W", "_", path), (Opaque,), {"class_path": path})
    return _OPAQUE_TYPES[path]


NAMESPACE = opaque_type("argparse.Namespace")


class _EasyDict(dict):
    """dnnlib.util.EasyDict as a plain dict."""


def _persistent_obj(meta) -> Opaque:
    """Replaces torch_utils.persistence._reconstruct_persistent_obj (which would exec meta['module_src'])."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError(f"unexpected persistent object record {type(meta).__name__}")
    obj = opaque_type(f"persistent:{meta.get('class_name')}")()
    obj.__setstate__(meta.get("state") or {})
    return obj


# ---------------------------------------------------------------------------------------------------------------------
# Tensors from bytes: torch's legacy single-storage format, parsed here (torch's own loader allocates the declared size)
# ---------------------------------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {f"{n}Storage": d for n, d in [
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8), ("Byte", torch.uint8),
    ("Bool", torch.bool)]}


class _StorageRef:
    def __init__(self, dtype, numel):
        self.dtype, self.numel = dtype, numel


class _LegacyUnpickler(pickle._Unpickler):
    """The small pickles of a legacy torch.save of one storage: ints, strings, dicts and the storage type only."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch.pop(pickle.BUILD[0])
    dispatch.pop(pickle.REDUCE[0])
    dispatch.pop(pickle.NEWOBJ[0])
    dispatch.pop(pickle.NEWOBJ_EX[0])
    dispatch.pop(pickle.INST[0])
    dispatch.pop(pickle.OBJ[0])

    def __init__(self, file, limit: int):
        super().__init__(file)
        self.limit, self.refs = limit, {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise UnsafePickleError(f"tensor bytes reference `{module}.{name}`, not a storage type")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[4], int) and pid[5] is None):
            raise UnsafePickleError("tensor bytes hold an unexpected storage record")
        dtype, key, numel = pid[1], pid[2], pid[4]
        if not 0 <= numel * dtype.itemsize <= self.limit:
            raise UnsafePickleError(f"a storage declares {numel} elements, more than the {self.limit} bytes present")
        return self.refs.setdefault(key, _StorageRef(dtype, numel))


def storage_from_bytes(data: bytes) -> Tensor:
    """Replaces torch.storage._load_from_bytes: the storage as a 1-D tensor, sizes checked before allocation."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("tensor bytes are not bytes")
    f = io.BytesIO(data)
    up = _LegacyUnpickler(f, len(data))
    up.load(), up.load(), up.load()  # magic number, protocol version, sys info
    ref = up.load()
    keys = up.load()
    if not isinstance(ref, _StorageRef) or not isinstance(keys, list) or len(keys) != 1 or keys[0] not in up.refs:
        raise UnsafePickleError("tensor bytes do not hold exactly one storage")
    (count,) = struct.unpack("<q", f.read(8).ljust(8, b"\0"))
    nbytes = count * ref.dtype.itemsize
    if count != ref.numel or len(data) - f.tell() < nbytes:
        raise UnsafePickleError(f"a storage declares {ref.numel} elements but holds {len(data) - f.tell()} bytes")
    raw = bytearray(f.read(nbytes))
    return torch.frombuffer(raw, dtype=ref.dtype) if nbytes else torch.empty(0, dtype=ref.dtype)


def _check_view(numel_storage: int, offset, size, stride, what: str) -> None:
    ints = [offset, *size, *stride]
    if len(size) != len(stride) or len(size) > MAX_NDIM or any(type(v) is not int or v < 0 for v in ints):
        raise UnsafePickleError(f"{what}: malformed tensor view (offset {offset}, size {size}, stride {stride})")
    numel = 1
    for s in size:
        numel *= s
    if numel == 0:
        return
    extent = offset + 1 + sum((n - 1) * st for n, st in zip(size, stride))
    if extent > numel_storage or numel > numel_storage or any(st == 0 for n, st in zip(size, stride) if n > 1):
        raise UnsafePickleError(f"{what}: a tensor view of {numel} elements (size {tuple(size)}, stride "
                                f"{tuple(stride)}) is not backed by its storage of {numel_storage} elements")


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, Tensor):
        raise UnsafePickleError("a tensor is rebuilt from something that is not tensor bytes")
    size, stride = tuple(size), tuple(stride)
    _check_view(storage.numel(), offset, size, stride, "pickled tensor")
    return storage.as_strided(size, stride, offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    if not isinstance(data, Tensor):
        raise UnsafePickleError("a parameter is rebuilt from something that is not a tensor")
    return torch.nn.Parameter(data, bool(requires_grad))


def _codecs_encode(text, encoding="utf-8"):
    """Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); nothing else is allowed."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not a bytes literal")
    return codecs.encode(text, encoding)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor, allowed only to create an Opaque placeholder."""
    if not (isinstance(cls, type) and issubclass(cls, Opaque)) or base is not object:
        raise UnsafePickleError(f"copyreg._reconstructor for {cls!r} / {base!r}")
    return cls()


def _newobj(cls, *args):
    if not (isinstance(cls, type) and issubclass(cls, (Opaque, collections.OrderedDict, dict, set, list))):
        raise UnsafePickleError(f"copyreg.__newobj__ for {cls!r}")
    return cls.__new__(cls)


# The allow-list: (module, name) -> what stands for it, one line per module.
_ALLOWED: dict[str, dict[str, object]] = {
    "builtins": {"set": set, "frozenset": frozenset, "dict": dict, "list": list, "tuple": tuple},
    "collections": {"OrderedDict": collections.OrderedDict},
    "_codecs": {"encode": _codecs_encode},
    "copyreg": {"_reconstructor": _reconstructor, "__newobj__": _newobj},
    "torch._utils": {"_rebuild_tensor_v2": _rebuild_tensor, "_rebuild_tensor": _rebuild_tensor,
                     "_rebuild_parameter": _rebuild_parameter, "_rebuild_parameter_with_state": _rebuild_parameter},
    "torch.storage": {"_load_from_bytes": storage_from_bytes},
    "torch": {"Size": torch.Size},
    "torch_utils.persistence": {"_reconstruct_persistent_obj": _persistent_obj},
    "dnnlib.util": {"EasyDict": _EasyDict},
    "dnnlib": {"EasyDict": _EasyDict},
    "argparse": {"Namespace": NAMESPACE},
}
_TABLE: dict[tuple[str, str], object] = {(m, n): f for m, names in _ALLOWED.items() for n, f in names.items()}
_NEWOBJ_OK = (Opaque, collections.OrderedDict, dict, set, list, _EasyDict)


class SafeUnpickler(pickle._Unpickler):
    """Pure-Python unpickler: allow-listed callables or inert placeholders only (never imports); BUILD only on its own
    placeholders and on dict instances the file created (never on a global); NEWOBJ only for those and containers."""

    dispatch = dict(pickle._Unpickler.dispatch)
    source = "<pickle>"

    def __init__(self, file, source: str = "<pickle>"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        hit = _TABLE.get((module, name))
        if hit is not None:
            return hit
        if module.startswith("torch.nn.modules.") or module.startswith("torch.nn.parameter"):
            return opaque_type(f"{module}.{name}")  # a plain torch module inside a network: keep its state only
        raise UnsafePickleError(
            f"{self.source}: refusing to load: the pickle references `{module}.{name}`, which is not a tensor, a "
            f"container or a known network record, so unpickling it could run code. Nothing from the file was executed. "
            f"Convert the checkpoint to a state dict (torch.save(model.state_dict())) or safetensors and import that.")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refusing to load: a plain pickle with persistent ids")

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Opaque):
            inst.__setstate__(state)
        elif type(inst) in (collections.OrderedDict, _EasyDict) and isinstance(state, dict) \
                and all(isinstance(k, str) for k in state):  # a state dict's _metadata: attributes of the file's own dict
            inst.__dict__.update(state)
        else:
            raise UnsafePickleError(f"{self.source}: refusing to load: the pickle sets the state of a "
                                    f"{type(inst).__name__}; only network records and dicts may carry state")

    def _load_newobj(self):
        self.stack.pop()  # the arguments: not given to cls.__new__
        cls = self.stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, _NEWOBJ_OK)):
            raise UnsafePickleError(f"{self.source}: refusing to load: the pickle creates a {cls!r}")
        self.append(cls.__new__(cls))

    def _refuse(self):
        raise UnsafePickleError(f"{self.source}: refusing to load: unsupported pickle opcode")

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    for _op in (pickle.NEWOBJ_EX, pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse
    del _op


def safe_unpickle_bytes(data: bytes, source: str = "<pickle>"):
    return SafeUnpickler(io.BytesIO(data), source).load()


# ---------------------------------------------------------------------------------------------------------------------
# torch zip files
# ---------------------------------------------------------------------------------------------------------------------


def check_torch_zip(data: bytes, source: str) -> None:
    """Refuse TorchScript archives and entries that are compressed or claim more bytes than the file holds."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise UnsafePickleError(f"{source}: not a readable torch zip file ({err})") from err
    for info in infos:
        parts = info.filename.split("/")
        if parts[-1] == "constants.pkl" or "code" in parts[1:-1] or parts[0] == "code":
            raise UnsafePickleError(f"{source}: refusing to load: a TorchScript archive (entry {info.filename}); "
                                    "loading it would run its code. Export the weights as a state dict or safetensors.")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > len(data):
            raise UnsafePickleError(f"{source}: zip entry {info.filename} is compressed or larger than the file")


def _torch_zip_load(data: bytes, source: str):
    check_torch_zip(data, source)
    with torch.serialization.safe_globals([(NAMESPACE, "argparse.Namespace")]):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------------
# The walk: each object once, bounded depth and bytes
# ---------------------------------------------------------------------------------------------------------------------


def check_tensors(obj, limit_bytes: int, source: str) -> None:
    """Every tensor backed by real, distinct storage bytes; total storage within limit_bytes; depth <= MAX_DEPTH."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    total = 0
    stack = [(obj, 0)]
    while stack:
        o, depth = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if len(seen) > MAX_OBJECTS:
            raise UnsafePickleError(f"{source}: more than {MAX_OBJECTS} objects; not a checkpoint")
        if depth > MAX_DEPTH:
            raise UnsafePickleError(f"{source}: objects nested deeper than {MAX_DEPTH} levels; not a checkpoint")
        if isinstance(o, Tensor):
            st = o.untyped_storage()
            n = st.nbytes() // max(o.element_size(), 1)
            _check_view(n, o.storage_offset(), tuple(o.shape), tuple(o.stride()), source)
            if st.data_ptr() not in storages:
                storages[st.data_ptr()] = st.nbytes()
                total += st.nbytes()
            if total > limit_bytes:
                raise UnsafePickleError(f"{source}: tensors hold more bytes than the file ({limit_bytes} bytes)")
            continue
        if isinstance(o, dict):
            children = [*o.keys(), *o.values()]
        elif isinstance(o, (list, tuple, set, frozenset)):
            children = list(o)
        elif isinstance(o, Opaque):
            children = list(vars(o).values())
        else:
            continue
        stack.extend((c, depth + 1) for c in children)


def read_checkpoint_object(data: bytes, source: str):
    """bytes of a .pt / .pth / .pkl -> the unpickled object (tensors checked), by a loader that runs no code."""
    if data[:4] == b"PK\x03\x04":
        try:
            obj = _torch_zip_load(data, source)
        except pickle.UnpicklingError as err:
            m = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f"references `{m.group(1)}`" if m else f"needs more than tensors ({str(err).splitlines()[-1][:200]})"
            raise UnsafePickleError(f"{source}: refusing to load: the pickle {what}, which is not a tensor or a "
                                    "container, so unpickling it could run code. Nothing from the file was executed. "
                                    "Convert the checkpoint to a state dict or safetensors and import that.") from err
        except (RuntimeError, EOFError, ValueError, AttributeError, KeyError) as err:
            if isinstance(err, UnsafePickleError):
                raise
            raise ValueError(f"{source}: not a readable torch checkpoint ({err})") from err
    else:
        try:
            obj = safe_unpickle_bytes(data, source)
        except UnsafePickleError as err:
            if str(err).startswith(f"{source}: "):
                raise
            raise UnsafePickleError(f"{source}: refusing to load: {err}") from None
        except RecursionError as err:
            raise UnsafePickleError(f"{source}: nested too deeply; not a checkpoint") from err
        except Exception as err:
            raise ValueError(f"{source}: not a readable checkpoint (a torch zip file or a pickle): {err}") from err
    check_tensors(obj, len(data), source)
    return obj


__all__ = ["UnsafePickleError", "Opaque", "SafeUnpickler", "read_checkpoint_object", "check_tensors",
           "safe_unpickle_bytes", "storage_from_bytes", "check_torch_zip"]
