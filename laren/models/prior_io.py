"""Import pre-trained StyleGAN2 priors safely, and load them back (architecture.md: `laren prior import`).

LAREN freezes a pre-trained StyleGAN2 generator (paper Sec. III; model-spec section 2.4). Public weights come in three
layouts; all are read without running code from the file and converted to the rosinality names of
``laren.models.stylegan2``:

(a) rosinality ``.pt``: ``{"g_ema", "latent_avg"?, "d"?, "g"?, "args"?, ...}``. Read with ``torch.load(weights_only=True)``;
    a training checkpoint's ``args`` (an argparse Namespace) becomes an inert placeholder through torch's safe globals.
(b) NVIDIA stylegan2-ada-pytorch ``.pkl``: a plain pickle of ``torch_utils.persistence`` objects (whose reconstruction
    would ``exec`` source stored in the file). The restricted unpickler of ``laren.models.safe_pickle`` never imports
    anything: it maps persistent objects and ``torch.nn`` modules to placeholders that only keep their state, rebuilds
    tensors from their bytes, and refuses every other global (os.system, eval, subprocess, ...) before it can run.
    NVIDIA names (``mapping.fc0``, ``synthesis.b4.conv1.affine``, ``b{r}.conv0/conv1/skip``, ``b4.fc/out``) are mapped to
    rosinality's. Not carried over: ``conv_clamp`` (rosinality has none) and the 1/sqrt(fan_in) weight gain that NVIDIA
    omits before demodulation (only the 1e-8 epsilon sees it).
(c) mmagic / mmgen ``.pth``: keys ``generator_ema.`` (else ``generator.``) and ``discriminator.``, possibly under
    ``state_dict``; equalised-lr parameters are ``*.weight_orig``. mmagic's PixelNorm uses eps 1e-6 (ours 1e-8).

The architecture (resolution, style_dim, mapping layers, channel table) is read from tensor shapes; the table is
expressed as ``min(channel_base // r, channel_max)``, never assumed stock.

Output (laren's prior format): ``DEST.safetensors`` (keys ``g.<name>``, ``d.<name>``, ``latent_avg``) and ``DEST.json``
(``PriorMeta``: architecture, source, and the sha256 of the safetensors). DEST is a local path or an ``s3://`` URL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import torch
from torch import Tensor

from laren.data import storage
from laren.models.safe_pickle import MAX_DEPTH, Opaque, UnsafePickleError, read_checkpoint_object
from laren.models.state_dict import load_strict
from laren.models.stylegan2 import Discriminator, Generator

STOCK_BASE_UNIT = 16384  # rosinality: channel_base = 16384 * channel_multiplier
ROSINALITY_LR_MLP = 0.01


@dataclasses.dataclass(frozen=True)
class PriorMeta:
    """Contents of DEST.json. ``channel_base`` / ``channel_max`` define the channel table; ``channel_multiplier`` is
    ``channel_base // 16384`` when that is exact (stock rosinality), else 1 and informative only."""

    resolution: int
    style_dim: int
    mapping_layers: int
    channel_multiplier: int
    channel_base: int
    channel_max: int
    has_discriminator: bool
    source: str
    source_format: str  # "rosinality" | "nvidia" | "mmagic" | "laren" (trained by `laren prior train`)
    sha256: str = ""
    latent_avg_source: str = "checkpoint"  # "checkpoint" | "computed" (mean of 4096 mapped z, seed 0)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "") -> "PriorMeta":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: prior metadata is not JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{where}: prior metadata is not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(data)
        if missing:
            raise ValueError(f"{where}: prior metadata lacks {sorted(missing)}; re-create it with `laren prior import`")
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self) -> str:
        return (f"StyleGAN2 {self.resolution}px, style_dim {self.style_dim}, {self.mapping_layers} mapping layers, "
                f"channels min({self.channel_base} // r, {self.channel_max}) (channel_multiplier "
                f"{self.channel_multiplier}), discriminator: {'yes' if self.has_discriminator else 'no'}, "
                f"source format: {self.source_format}, latent_avg: {self.latent_avg_source}")


# ---------------------------------------------------------------------------------------------------------------------
# Layout conversion -> rosinality names
# ---------------------------------------------------------------------------------------------------------------------


def _opaque_tensors(root, source: str) -> dict[str, Tensor]:
    """Flatten an Opaque module tree (``_parameters`` / ``_buffers`` / ``_modules``) into a state dict; each module is
    visited once (a shared sub-module keeps its first name) and the depth is bounded."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    stack = [(root, "", 0)]
    while stack:
        obj, prefix, depth = stack.pop()
        if id(obj) in seen or not isinstance(obj, Opaque):
            continue
        if depth > MAX_DEPTH:
            raise UnsafePickleError(f"{source}: network modules nested deeper than {MAX_DEPTH} levels")
        seen.add(id(obj))
        state = getattr(obj, "state", None)
        state = state if isinstance(state, dict) else {}
        skip = state.get("_non_persistent_buffers_set")
        skip = set(skip) if isinstance(skip, (set, frozenset, list, tuple)) else set()
        for kind in ("_parameters", "_buffers"):
            items = state.get(kind)
            for name, t in (items.items() if isinstance(items, dict) else ()):
                if isinstance(t, Tensor) and not (kind == "_buffers" and name in skip):
                    out[f"{prefix}{name}"] = t.detach()
        subs = state.get("_modules")
        stack.extend((sub, f"{prefix}{name}.", depth + 1) for name, sub in (subs.items() if isinstance(subs, dict) else ()))
    return out


def _nvidia_g(nv: dict[str, Tensor], lr_multiplier: float, source: str) -> tuple[dict[str, Tensor], Tensor | None]:
    if "synthesis.b4.const" not in nv:
        raise ValueError(f"{source}: G_ema has no synthesis.b4.const: not a StyleGAN2 (stylegan2-ada) generator "
                         "(StyleGAN3 and other networks are not supported)")
    if any(k.startswith("mapping.embed") for k in nv):
        raise ValueError(f"{source}: conditional generators (c_dim > 0) are not supported")
    ros: dict[str, Tensor] = {}
    n_map = 1 + max(int(m.group(1)) for k in nv if (m := re.match(r"mapping\.fc(\d+)\.weight$", k)))
    gain = lr_multiplier / ROSINALITY_LR_MLP  # re-express the weights for rosinality's lr_mul 0.01
    for i in range(n_map):
        ros[f"style.{i + 1}.weight"] = nv[f"mapping.fc{i}.weight"] * gain
        ros[f"style.{i + 1}.bias"] = nv[f"mapping.fc{i}.bias"] * gain
    resolutions = sorted(int(m.group(1)) for k in nv if (m := re.match(r"synthesis\.b(\d+)\.torgb\.weight$", k)))
    top = max(int(m.group(1)) for k in nv if (m := re.match(r"synthesis\.b(\d+)\.", k)))
    if resolutions != [2**i for i in range(2, top.bit_length())]:
        raise ValueError(f"{source}: only the 'skip' generator architecture (a ToRGB at every resolution) is supported")

    def conv(dst: str, src: str, noise_idx: int):
        ros[f"{dst}.conv.weight"] = nv[f"{src}.weight"].unsqueeze(0)
        ros[f"{dst}.conv.modulation.weight"] = nv[f"{src}.affine.weight"]
        ros[f"{dst}.conv.modulation.bias"] = nv[f"{src}.affine.bias"]
        ros[f"{dst}.noise.weight"] = nv[f"{src}.noise_strength"].reshape(1)
        ros[f"{dst}.activate.bias"] = nv[f"{src}.bias"]
        r = nv[f"{src}.noise_const"].shape[-1]
        ros[f"noises.noise_{noise_idx}"] = nv[f"{src}.noise_const"].reshape(1, 1, r, r)

    def torgb(dst: str, src: str):
        ros[f"{dst}.conv.weight"] = nv[f"{src}.torgb.weight"].unsqueeze(0)
        ros[f"{dst}.conv.modulation.weight"] = nv[f"{src}.torgb.affine.weight"]
        ros[f"{dst}.conv.modulation.bias"] = nv[f"{src}.torgb.affine.bias"]
        ros[f"{dst}.bias"] = nv[f"{src}.torgb.bias"].reshape(1, -1, 1, 1)

    ros["input.input"] = nv["synthesis.b4.const"].unsqueeze(0)
    conv("conv1", "synthesis.b4.conv1", 0)
    torgb("to_rgb1", "synthesis.b4")
    for k, r in enumerate(resolutions[1:]):
        conv(f"convs.{2 * k}", f"synthesis.b{r}.conv0", 2 * k + 1)
        conv(f"convs.{2 * k + 1}", f"synthesis.b{r}.conv1", 2 * k + 2)
        torgb(f"to_rgbs.{k}", f"synthesis.b{r}")
    _check_nvidia_filters(nv, source)
    return ros, nv.get("mapping.w_avg")


def _check_nvidia_filters(nv: dict[str, Tensor], source: str) -> None:
    ref = torch.tensor([1.0, 3.0, 3.0, 1.0])
    ref = torch.outer(ref, ref) / 64
    for k, t in nv.items():
        if k.endswith("resample_filter") and not torch.allclose(t.float(), ref, atol=1e-6):
            raise ValueError(f"{source}: {k} is not the [1,3,3,1] filter; other resampling filters are not supported")


def _nvidia_d(nv: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    if any(k.startswith("mapping.") for k in nv) or "b4.out.weight" not in nv or nv["b4.out.weight"].shape[0] != 1:
        raise ValueError(f"{source}: only unconditional 'resnet' discriminators are supported")
    res = sorted((int(m.group(1)) for k in nv if (m := re.match(r"b(\d+)\.conv0\.weight$", k))), reverse=True)
    top = res[0]
    if f"b{top}.fromrgb.weight" not in nv or any(f"b{r}.skip.weight" not in nv for r in res):
        raise ValueError(f"{source}: only the 'resnet' discriminator architecture is supported")
    _check_nvidia_filters(nv, source)
    ros = {"convs.0.0.weight": nv[f"b{top}.fromrgb.weight"], "convs.0.1.bias": nv[f"b{top}.fromrgb.bias"]}
    for i, r in enumerate(res, start=1):
        ros[f"convs.{i}.conv1.0.weight"] = nv[f"b{r}.conv0.weight"]
        ros[f"convs.{i}.conv1.1.bias"] = nv[f"b{r}.conv0.bias"]
        ros[f"convs.{i}.conv2.1.weight"] = nv[f"b{r}.conv1.weight"]
        ros[f"convs.{i}.conv2.2.bias"] = nv[f"b{r}.conv1.bias"]
        ros[f"convs.{i}.skip.1.weight"] = nv[f"b{r}.skip.weight"]
    ros.update({"final_conv.0.weight": nv["b4.conv.weight"], "final_conv.1.bias": nv["b4.conv.bias"],
                "final_linear.0.weight": nv["b4.fc.weight"], "final_linear.0.bias": nv["b4.fc.bias"],
                "final_linear.1.weight": nv["b4.out.weight"], "final_linear.1.bias": nv["b4.out.bias"]})
    return ros


_MMAGIC_G_RULES = [
    (r"^style_mapping\.", "style."),
    (r"^constant_input\.", "input."),
    (r"^injected_noise_(\d+)$", r"noises.noise_\1"),
    (r"\.style_modulation\.", ".modulation."),
    (r"\.noise_injector\.", ".noise."),
    (r"\.linear\.weight(_orig)?$", ".weight"),
    (r"_orig$", ""),
]
_MMAGIC_D_RULES = [
    (r"\.linear\.weight(_orig)?$", ".weight"),
    (r"(\.\d+)\.conv\.(weight|bias)(_orig)?$", r"\1.\2"),
    (r"_orig$", ""),
]


def _rename(sd: dict[str, Tensor], rules) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def _with_prefix(sd: dict, prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def to_rosinality(obj, source: str) -> tuple[str, dict[str, Tensor], dict[str, Tensor] | None, Tensor | None]:
    """Unpickled checkpoint -> (format, g state dict, d state dict or None, latent_avg or None), rosinality names."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a checkpoint dict, got {type(obj).__name__}")
    if "g_ema" in obj or ("g" in obj and isinstance(obj.get("g"), dict)):
        g = obj.get("g_ema", obj.get("g"))
        d = obj.get("d") if isinstance(obj.get("d"), dict) else None
        avg = obj.get("latent_avg")
        return "rosinality", dict(g), (dict(d) if d else None), avg
    if isinstance(obj.get("G_ema"), Opaque):
        gk = obj["G_ema"].state.get("init_kwargs") or {}
        lr = float((gk.get("mapping_kwargs") or {}).get("lr_multiplier", ROSINALITY_LR_MLP))
        g, avg = _nvidia_g(_opaque_tensors(obj["G_ema"], source), lr, source)
        d = _nvidia_d(_opaque_tensors(obj["D"], source), source) if isinstance(obj.get("D"), Opaque) else None
        return "nvidia", g, d, avg
    sd = obj.get("state_dict", obj)
    if isinstance(sd, dict):
        for gp in ("generator_ema.", "generator."):
            g = _with_prefix(sd, gp)
            if g:
                g = _rename(g, _MMAGIC_G_RULES)
                avg = g.pop("w_avg", None)
                d = _rename(_with_prefix(sd, "discriminator."), _MMAGIC_D_RULES) or None
                return "mmagic", g, d, avg
    raise ValueError(f"{source}: unrecognised checkpoint layout (top-level keys {sorted(map(str, obj))[:12]}); expected "
                     "rosinality {g_ema, latent_avg}, NVIDIA stylegan2-ada {G_ema, D} or mmagic generator_ema.* keys")


# ---------------------------------------------------------------------------------------------------------------------
# Architecture detection
# ---------------------------------------------------------------------------------------------------------------------


def fit_channel_table(channels: dict[int, int], source: str = "") -> tuple[int, int, int]:
    """{r: C_r} -> (channel_base, channel_max, channel_multiplier) with C_r = min(channel_base // r, channel_max).

    The stock base 16384 * m is preferred when the table allows it; otherwise the smallest base that fits.
    """
    cmax = max(channels.values())
    lo, hi = 1, 1 << 40
    for r, c in channels.items():
        if c < cmax:  # unsaturated: base // r == c
            lo, hi = max(lo, c * r), min(hi, (c + 1) * r - 1)
        else:  # saturated: base // r >= cmax
            lo = max(lo, cmax * r)
    if lo > hi:
        raise ValueError(f"{source}: channel table {channels} is not of the form min(channel_base // r, channel_max)")
    stock = [m * STOCK_BASE_UNIT for m in range(1, 65) if lo <= m * STOCK_BASE_UNIT <= hi]
    base = stock[0] if stock else lo
    return base, cmax, (base // STOCK_BASE_UNIT if base % STOCK_BASE_UNIT == 0 else 1)


def detect_generator(g: dict[str, Tensor], source: str = "") -> dict:
    """rosinality-named generator state dict -> Generator kwargs."""
    try:
        n_rgb = 1 + sum(1 for k in g if re.match(r"to_rgbs\.\d+\.conv\.weight$", k))
        resolution = 4 * 2 ** (n_rgb - 1)
        channels = {4: int(g["input.input"].shape[1])}
        for k in range(n_rgb - 1):
            channels[8 * 2**k] = int(g[f"convs.{2 * k}.conv.weight"].shape[1])
        style_dim = int(g["conv1.conv.modulation.weight"].shape[1])
        mapping_layers = sum(1 for k in g if re.match(r"style\.\d+\.weight$", k))
    except KeyError as err:
        raise ValueError(f"{source}: generator state dict lacks {err}; not a StyleGAN2 generator") from err
    base, cmax, cm = fit_channel_table(channels, source)
    return dict(resolution=resolution, style_dim=style_dim, mapping_layers=mapping_layers, channel_multiplier=cm,
                channel_base=base, channel_max=cmax)


def _load_strict(module: torch.nn.Module, sd: dict[str, Tensor], what: str, source: str) -> None:
    own = module.state_dict()
    sd = dict(sd)
    for k, v in own.items():  # constant FIR kernels may be absent in converted layouts: take the built value
        if k.endswith("kernel") and k not in sd:
            sd[k] = v
    load_strict(module, {k: v.float() for k, v in sd.items()},
                f"{source}: {what} does not match the detected architecture")


_ARCH_LIMITS = {"resolution": (32, 1024), "style_dim": (1, 4096), "mapping_layers": (1, 32),
                "channel_multiplier": (1, 64), "channel_base": (1, 1 << 24), "channel_max": (1, 4096)}


def check_arch(arch: dict, has_discriminator: bool, limit_bytes: int, source: str) -> None:
    """Refuse an architecture out of range, or whose weights would take more than limit_bytes, before allocating it
    (the modules are built on the meta device to count)."""
    for name, (lo, hi) in _ARCH_LIMITS.items():
        v = arch.get(name)
        if type(v) is not int or not lo <= v <= hi:
            raise ValueError(f"{source}: {name} = {v!r} is outside [{lo}, {hi}]")
    if arch["resolution"] & (arch["resolution"] - 1):
        raise ValueError(f"{source}: resolution {arch['resolution']} is not a power of two")
    arch = {k: arch[k] for k in _ARCH_LIMITS}
    with torch.device("meta"):
        mods = [Generator(**arch)]
        if has_discriminator:
            mods.append(Discriminator(arch["resolution"], channel_max=arch["channel_max"],
                                      channel_base=arch["channel_base"]))
    need = sum(t.numel() * t.element_size() for m in mods for t in m.state_dict().values())
    if need > limit_bytes:
        raise ValueError(f"{source}: the architecture needs {need} bytes of weights, more than the {limit_bytes} bytes "
                         "the file holds")


def build_from_state(g_sd, d_sd, latent_avg, source: str, limit_bytes: int):
    """-> (Generator, Discriminator | None, arch kwargs, latent_avg_source). limit_bytes bounds the weights built."""
    arch = detect_generator(g_sd, source)
    check_arch(arch, bool(d_sd), limit_bytes, source)
    g = Generator(**arch)
    _load_strict(g, g_sd, "generator", source)
    d = None
    if d_sd:
        d = Discriminator(arch["resolution"], channel_max=arch["channel_max"], channel_base=arch["channel_base"])
        _load_strict(d, d_sd, "discriminator", source)
    how = "checkpoint"
    if latent_avg is None:
        with torch.no_grad():
            z = torch.randn(4096, arch["style_dim"], generator=torch.Generator().manual_seed(0))
            latent_avg = g.mapping(z).mean(0)
        how = "computed"
    g.latent_avg.copy_(latent_avg.reshape(-1).float())
    return g, d, arch, how


def read_prior_source(src: str) -> tuple[Generator, Discriminator | None, dict, str, str]:
    """Checkpoint file -> (G, D | None, arch, source_format, latent_avg_source). Runs no code from the file.

    A laren prior (``X.safetensors`` beside ``X.json``, e.g. one written by `laren prior train`) is read as it is:
    its tensors, architecture and latent_avg come back unchanged (source format ``laren``)."""
    if str(src).endswith((".safetensors", ".json")):
        g, d, meta = load_prior(src)
        arch = {k: getattr(meta, k) for k in ("resolution", "style_dim", "mapping_layers", "channel_multiplier",
                                              "channel_base", "channel_max")}
        return g, d, arch, "laren", meta.latent_avg_source
    data = _read(src, what="source checkpoint",
                 hint="give the path of a rosinality .pt, NVIDIA stylegan2-ada .pkl or mmagic .pth file")
    obj = read_checkpoint_object(data, src)
    try:
        fmt, g_sd, d_sd, avg = to_rosinality(obj, src)
    except (TypeError, AttributeError, KeyError, IndexError) as err:
        raise ValueError(f"{src}: malformed checkpoint ({type(err).__name__}: {err})") from err
    # weights stored in half precision double in float32; the rest (kernels, noise buffers) is small
    g, d, arch, how = build_from_state(g_sd, d_sd, avg, src, 2 * len(data) + (16 << 20))
    return g, d, arch, fmt, how


# ---------------------------------------------------------------------------------------------------------------------
# Storage (local paths with atomic rename; s3:// through laren.data.storage)
# ---------------------------------------------------------------------------------------------------------------------


def _read(url: str, what: str, hint: str) -> bytes:
    try:
        return storage.read_bytes(url)
    except (FileNotFoundError, IsADirectoryError) as err:
        raise FileNotFoundError(f"{url}: {what} not found; {hint}") from err


def _stem(url: str) -> str:
    for suffix in (".safetensors", ".json"):
        if str(url).endswith(suffix):
            return str(url)[: -len(suffix)]
    return str(url)


def prior_paths(url: str) -> tuple[str, str]:
    """DEST (with or without suffix) -> (DEST.safetensors, DEST.json)."""
    stem = _stem(url)
    return stem + ".safetensors", stem + ".json"


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def import_prior(src: str, dest: str) -> PriorMeta:
    """Read SRC (rosinality / NVIDIA / mmagic, or a laren prior), write DEST.safetensors then DEST.json; return the
    metadata."""
    g, d, arch, fmt, how = read_prior_source(str(src))
    return write_prior(g, d, arch, dest, source=str(src), source_format=fmt, latent_avg_source=how)


def write_prior(g: Generator, d: Discriminator | None, arch: dict, dest: str, source: str, source_format: str,
                latent_avg_source: str) -> PriorMeta:
    """Write G (with its ``latent_avg``) and D in laren's prior format: DEST.safetensors, then DEST.json."""
    from safetensors.torch import save as st_save

    tensors = {f"g.{k}": v.detach().cpu().clone().contiguous() for k, v in g.state_dict().items()}
    if d is not None:
        tensors.update({f"d.{k}": v.detach().cpu().clone().contiguous() for k, v in d.state_dict().items()})
    tensors["latent_avg"] = g.latent_avg.detach().cpu().clone().contiguous()
    # One metadata entry: safetensors writes its metadata map in no fixed order, so with two the bytes (and sha256) of
    # the same tensors could differ from one write to the next.
    blob = st_save(tensors, metadata={"format": "laren-prior/1"})
    st_url, json_url = prior_paths(dest)
    meta = PriorMeta(**arch, has_discriminator=d is not None, source=source, source_format=source_format,
                     sha256=hashlib.sha256(blob).hexdigest(), latent_avg_source=latent_avg_source)
    storage.write_bytes(st_url, blob)  # atomic: a local temp file renamed into place, or one S3 PUT
    storage.write_bytes(json_url, meta.to_json().encode())  # written last: its presence means the prior is complete
    return meta


def load_prior(url: str) -> tuple[Generator, Discriminator | None, PriorMeta]:
    """Load a prior written by import_prior (verifies the sha256). Returns (G in eval mode, D or None, meta)."""
    from safetensors.torch import load as st_load

    st_url, json_url = prior_paths(url)
    hint = "create it with `laren prior import SRC DEST` (SRC: a rosinality .pt, NVIDIA .pkl or mmagic .pth)"
    meta = PriorMeta.from_json(_read(json_url, "prior metadata (.json)", hint).decode(), json_url)
    blob = _read(st_url, "prior weights (.safetensors)", hint)
    check_arch(dataclasses.asdict(meta), meta.has_discriminator, len(blob), json_url)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.sha256:
        raise ValueError(f"{st_url}: checksum mismatch (sha256 {digest}, {json_url} says {meta.sha256}); the file is "
                         "corrupt or was replaced; re-run `laren prior import`")
    tensors = st_load(blob)
    g = Generator(meta.resolution, meta.style_dim, meta.mapping_layers, meta.channel_multiplier, meta.channel_max,
                  meta.channel_base)
    g.load_state_dict(_with_prefix(tensors, "g."), strict=True)
    g.latent_avg.copy_(tensors["latent_avg"])
    d = None
    if meta.has_discriminator:
        d = Discriminator(meta.resolution, meta.channel_multiplier, meta.channel_max, meta.channel_base)
        d.load_state_dict(_with_prefix(tensors, "d."), strict=True)
        d.eval()
    return g.eval(), d, meta


__all__ = ["PriorMeta", "UnsafePickleError", "import_prior", "write_prior", "load_prior", "read_prior_source",
           "detect_generator", "fit_channel_table", "to_rosinality", "read_checkpoint_object", "prior_paths"]
