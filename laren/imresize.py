"""MATLAB-compatible bicubic resize (``imresize(img, scale, 'bicubic')`` with antialiasing), in torch.

The LR inputs of LAREN, like GLEAN's and mmagic's, are made with MATLAB's bicubic downscale: Keys cubic (a = -0.5),
kernel stretched by 1/scale when downscaling (antialiasing), output pixel x (1-based) sampling the input at
u = x/scale + 0.5*(1 - 1/scale), weights normalised to sum 1 per output pixel, borders mirrored
edge-inclusively (MATLAB's index rule: position p in [1..n, n..1] taken mod 2n), output size
ceil(H*scale) x ceil(W*scale), H resized before W. PIL, OpenCV and ``F.interpolate(antialias=False)`` differ.

Each axis is one dense (out, in) weight matrix: mirrored taps of the same input pixel are summed into one entry,
so a resize is ``Mh @ img @ Mw^T``: batched, exact in float64 (<= 5e-15 against MATLAB's ``contributions``),
and fast on CPU and GPU. Weights are built in float64 and cast to the image dtype.

The uint8 pipeline (:func:`imresize_uint8`) gives the same bytes on every device, so the LR can be made on the CPU in a
loader worker or on the training GPU from the uint8 HR: it runs in float64, where the devices' different summation
orders (and CUDA's division by a scalar as a product with its reciprocal) move a value by ~1e-13, while float32 (or
TF32) moves it by ~1e-5: enough, now and then, to cross a 0.5 rounding boundary of the uint8 output. The /255 is
applied to the small output rather than to the full input (the same result to ~1e-15).

Shapes: B batch, C channels, H/W input size, h/w output size.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["imresize", "imresize_uint8", "output_size", "resize_matrix"]


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys cubic kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


def output_size(length: int, scale: float) -> int:
    """MATLAB's output length: ceil(length * scale)."""
    return int(math.ceil(length * scale))


@functools.lru_cache(maxsize=64)
def _matrix_f64(in_len: int, out_len: int, scale: float, antialiasing: bool) -> torch.Tensor:
    kernel_width = 4.0
    if scale < 1 and antialiasing:
        kernel_width = kernel_width / scale  # stretched kernel: support 4/scale input pixels
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # (out,) input coordinate, 1-based
    left = torch.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # (out, taps) 1-based input indices
    dist = u[:, None] - idx
    if scale < 1 and antialiasing:
        w = scale * _cubic(dist * scale)
    else:
        w = _cubic(dist)
    w = w / w.sum(dim=1, keepdim=True)
    # MATLAB mirroring: index i (1-based) -> aux[(i-1) mod 2n], aux = [1..n, n..1]
    n = in_len
    aux = torch.cat([torch.arange(n), torch.arange(n - 1, -1, -1)])
    src = aux[torch.remainder(idx.long() - 1, 2 * n)]  # (out, taps) 0-based
    m = torch.zeros(out_len, in_len, dtype=torch.float64)
    m.scatter_add_(1, src, w)
    return m


def resize_matrix(in_len: int, out_len: int, scale: float, antialiasing: bool = True,
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """(out_len, in_len) weights of one axis: ``out = M @ in``."""
    return _matrix_f64(int(in_len), int(out_len), float(scale), bool(antialiasing)).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _matrix_on(in_len: int, out_len: int, scale: float, antialiasing: bool, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """:func:`resize_matrix`, kept on its device: no host-to-device copy per call (never handed out: never written)."""
    return resize_matrix(in_len, out_len, scale, antialiasing, dtype, device)


def imresize(img: torch.Tensor, scale: float, antialiasing: bool = True) -> torch.Tensor:
    """Resize by ``scale`` like MATLAB ``imresize(img, scale, 'bicubic')``.

    img: float tensor (..., H, W), e.g. (B, C, H, W) or (C, H, W); returns (..., ceil(H*scale), ceil(W*scale)) in
    the same dtype and device. Values are not clipped (bicubic overshoots); clip only when quantising
    (see :func:`imresize_uint8`).
    """
    if not torch.is_floating_point(img):
        raise TypeError(f"imresize takes a float tensor, got {img.dtype}; use imresize_uint8 for uint8 images")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    H, W = img.shape[-2], img.shape[-1]
    h, w = output_size(H, scale), output_size(W, scale)
    mh = _matrix_on(H, h, float(scale), bool(antialiasing), img.dtype, img.device)  # (h, H)
    mw = _matrix_on(W, w, float(scale), bool(antialiasing), img.dtype, img.device)  # (w, W)
    out = torch.matmul(mh, img)  # (..., h, W): H first, as MATLAB
    return torch.matmul(out, mw.transpose(0, 1))  # (..., h, w)


def imresize_uint8(img: torch.Tensor, scale: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The LR-making pipeline of GLEAN / mmagic: uint8 -> /255 -> bicubic -> clip [0, 1] -> x255 -> round -> uint8.

    img: uint8 (..., H, W) on any device. Rounding is half away from zero (MATLAB). float64 (the default) gives the same
    bytes on the CPU and on a GPU (see the module docstring); float32 gives the same bytes as float64 on the reference
    cases (no value lies within 1.4e-4 of a .5 tie), but not on every image, nor the same bytes on every device.
    """
    if img.dtype != torch.uint8:
        raise TypeError(f"imresize_uint8 takes a uint8 tensor, got {img.dtype}")
    if img.device.type == "cpu":  # numpy converts ~4x faster than torch's .to() on one core; exact either way
        x = torch.from_numpy(img.numpy().astype(torch.empty((), dtype=dtype).numpy().dtype))
    else:
        x = img.to(dtype)
    out = imresize(x, scale) / 255.0
    return torch.floor(out.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
