"""Optional compiled CPU loops for sparse down-projections, built on first use with the system C
compiler: the gather-weighted-sum, the masked down-projection straight from h, and the count of
active units that the default MLP forward's per-call decision needs.

``embedding_bag`` (the torch path) streams the selected rows at ~60% of the rate a dense GEMV
streams the same bytes, which caps an activation-sparse down-projection at ~55% of its ideal
speedup. The loop below reads four rows at a time into one output row that stays in L1
(``y += a0 r0 + a1 r1 + a2 r2 + a3 r3``, vectorised by the compiler for the host CPU), i.e. the
same access pattern as a GEMV over the selected rows, and skips entries whose value is zero
(`mask_code`'s padding), so a padded batch reads only its real rows. `masked_down` takes the
dense hidden activations themselves and picks the active units while it goes, so the MLP's
sparse down-projection builds no index list at all (``active_code`` alone cost ~10% of it).

It is compiled once per (source, compiler, CPU) into ``$SAELAB_NATIVE_DIR`` (default
``$XDG_CACHE_HOME/saelab/native`` or ``~/.cache/saelab/native``) with ``$CC`` (default ``cc``),
written atomically and loaded with ctypes: no torch headers, no ninja, well under a second. When
no compiler is found, compiling fails or ``SAELAB_NATIVE=0``, `library` returns None and callers
keep the torch path; `status` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
  uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, sizeof f); return f;
}
#define AS_FLOAT(x) (x)

/* y += sum of a[m] * r[m] over n <= 4 rows; four at once stream like a GEMV into an L1-resident y */
#define AXPY(SUF, T, LOAD)                                                                      \
static inline void axpy_##SUF(float *restrict y, const T **r, const float *a, int n, int64_t d) { \
  if (n == 4) {                                                                                 \
    const T *restrict r0 = r[0], *restrict r1 = r[1], *restrict r2 = r[2], *restrict r3 = r[3]; \
    const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];                                     \
    for (int64_t c = 0; c < d; c++)                                                             \
      y[c] += a0 * LOAD(r0[c]) + a1 * LOAD(r1[c]) + a2 * LOAD(r2[c]) + a3 * LOAD(r3[c]);       \
    return;                                                                                     \
  }                                                                                             \
  for (int m = 0; m < n; m++) {                                                                 \
    const T *restrict r0 = r[m]; const float a0 = a[m];                                         \
    for (int64_t c = 0; c < d; c++) y[c] += a0 * LOAD(r0[c]);                                   \
  }                                                                                             \
}

/* out[b, :] = sum_j vals[b, j] W[idx[b, j], :], zero values skipped (padding) */
#define GATHER(SUF, T)                                                                          \
void gather_##SUF(const int64_t *restrict idx, const float *restrict vals, int64_t batch,      \
                  int64_t k, const T *restrict W, int64_t d, float *restrict out) {             \
  for (int64_t b = 0; b < batch; b++) {                                                         \
    float *restrict y = out + b * d;                                                            \
    const T *r[4]; float a[4]; int n = 0;                                                       \
    memset(y, 0, (size_t)d * sizeof(float));                                                    \
    for (int64_t j = 0; j < k; j++) {                                                           \
      const float v = vals[b * k + j];                                                          \
      if (v == 0.0f) continue;                                                                  \
      r[n] = W + idx[b * k + j] * d; a[n] = v;                                                  \
      if (++n == 4) { axpy_##SUF(y, r, a, 4, d); n = 0; }                                       \
    }                                                                                           \
    axpy_##SUF(y, r, a, n, d);                                                                  \
  }                                                                                             \
}

/* out[b, :] = sum over units i with |h[b, i]| > threshold (h != 0 at threshold 0) of h[b, i] W[i, :]:
   the down-projection straight from the dense hidden activations, no index list built */
#define MASKED(SUF, T, LOAD)                                                                    \
void masked_##SUF(const T *restrict h, int64_t batch, int64_t units, const T *restrict W,       \
                  int64_t d, float threshold, float *restrict out) {                            \
  for (int64_t b = 0; b < batch; b++) {                                                         \
    float *restrict y = out + b * d;                                                            \
    const T *hb = h + b * units;                                                                \
    const T *r[4]; float a[4]; int n = 0;                                                       \
    memset(y, 0, (size_t)d * sizeof(float));                                                    \
    for (int64_t i = 0; i < units; i++) {                                                       \
      const float v = LOAD(hb[i]);                                                              \
      if (threshold == 0.0f ? v == 0.0f : !(fabsf(v) > threshold)) continue;                    \
      r[n] = W + i * d; a[n] = v;                                                               \
      if (++n == 4) { axpy_##SUF(y, r, a, 4, d); n = 0; }                                       \
    }                                                                                           \
    axpy_##SUF(y, r, a, n, d);                                                                  \
  }                                                                                             \
}

/* the number of entries with |h| > threshold (h != 0 at threshold 0): the rows `masked` would read */
#define COUNT(SUF, T, LOAD)                                                                     \
int64_t count_##SUF(const T *restrict h, int64_t n, float threshold) {                          \
  int64_t count = 0;                                                                            \
  if (threshold == 0.0f) { for (int64_t i = 0; i < n; i++) count += LOAD(h[i]) != 0.0f; }       \
  else { for (int64_t i = 0; i < n; i++) count += fabsf(LOAD(h[i])) > threshold; }              \
  return count;                                                                                 \
}

COUNT(f32, float, AS_FLOAT)
COUNT(bf16, uint16_t, bf16_to_float)
AXPY(f32, float, AS_FLOAT)
AXPY(bf16, uint16_t, bf16_to_float)
GATHER(f32, float)
GATHER(bf16, uint16_t)
MASKED(f32, float, AS_FLOAT)
MASKED(bf16, uint16_t, bf16_to_float)
"""

FLAGS = ("-O3", "-march=native", "-std=c11", "-shared", "-fPIC")
ENV_SWITCH = "SAELAB_NATIVE"
DTYPES = (torch.float32, torch.bfloat16)
"""Weight dtypes the compiled loop reads (it accumulates in fp32)."""

_SIGNATURES = {
    "gather": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
               ctypes.c_int64, ctypes.c_void_p],
    "masked": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
               ctypes.c_float, ctypes.c_void_p],
    "count": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float],
}
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_problem: list[str] = []


def cache_dir() -> Path:
    if os.environ.get("SAELAB_NATIVE_DIR"):
        return Path(os.environ["SAELAB_NATIVE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "saelab" / "native"


def enabled() -> bool:
    """False when ``SAELAB_NATIVE`` is 0/off/false (read at every call)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    first = text.split("\n\n", 1)[0]
    return "\n".join(line for line in first.splitlines() if line.startswith(("model name", "flags")))


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE, compiler, version, *FLAGS, platform.machine(),
                                    _cpu_identity()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"gather-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "gather.c", Path(tmp) / "gather.so"
        src.write_text(SOURCE)
        done = subprocess.run([compiler, *FLAGS, "-o", str(lib), str(src)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(lib, target)  # atomic: a concurrent build of the same key writes the same file
    return target


@cache
def _load() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        _problem.append(f"no C compiler ({os.environ.get('CC') or 'cc'} not found; set CC)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _problem.append(f"{type(e).__name__}: {e}")
        return None
    for name, argtypes in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            getattr(lib, f"{name}_{suffix}").argtypes = argtypes
            getattr(lib, f"{name}_{suffix}").restype = ctypes.c_int64 if name == "count" else None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built and cached on first call), or None when unavailable or off."""
    return _load() if enabled() else None


def status() -> str:
    """'compiled', 'off' or why the compiled kernel is unavailable."""
    if not enabled():
        return f"off ({ENV_SWITCH}=0)"
    return "compiled" if _load() is not None else f"unavailable: {_problem[-1]}"


def _one_thread_of_work(batch: int) -> bool:
    """The loop is single-threaded, where torch spreads tokens over threads: take one token on
    any thread count, a batch only when torch runs on one thread."""
    return batch == 1 or torch.get_num_threads() == 1


def usable(idx: torch.Tensor, W: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `gather_weighted_sum` can take these tensors: CPU, a contiguous fp32/bf16 ``W``, an
    fp32/bf16 result, one thread's worth of work, and the kernel built."""
    return (W.device.type == "cpu" and W.dtype in DTYPES and dtype in DTYPES and W.is_contiguous()
            and _one_thread_of_work(idx.shape[0]) and library() is not None)


def usable_masked(h: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether `masked_down` can take these tensors: as `usable`, ``h`` contiguous in W's dtype,
    and no gradient wanted (the loop has no backward; `sparse_mlp_down` has)."""
    return (h.device.type == "cpu" and W.dtype in DTYPES and h.dtype == W.dtype and h.dim() == 2
            and h.is_contiguous() and W.is_contiguous() and _one_thread_of_work(h.shape[0])
            and not (torch.is_grad_enabled() and (h.requires_grad or W.requires_grad))
            and library() is not None)


def gather_weighted_sum(idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """``out[b] = sum_j vals[b, j] * W[idx[b, j]]`` in fp32, returned in ``dtype``. Indices must
    be in range (they are not checked here). Call only when `usable`."""
    lib = library()
    assert lib is not None
    idx = idx.to(torch.int64).contiguous()
    vals = vals.to(torch.float32).contiguous()
    out = torch.empty(idx.shape[0], W.shape[1], dtype=torch.float32)
    getattr(lib, f"gather_{_SUFFIX[W.dtype]}")(idx.data_ptr(), vals.data_ptr(), idx.shape[0], idx.shape[1],
                                                W.data_ptr(), W.shape[1], out.data_ptr())
    return out if dtype == torch.float32 else out.to(dtype)


def masked_down(h: torch.Tensor, W: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """``h @ W`` over each token's active units only (|h| > threshold; h != 0 at 0), straight from
    the dense (B, n) ``h``: no index list is built. fp32 accumulation, result in h's dtype. Call
    only when `usable_masked`."""
    if h.shape[1] != W.shape[0]:
        raise ValueError(f"h has {h.shape[1]} units but W has {W.shape[0]} rows")
    lib = library()
    assert lib is not None
    out = torch.empty(h.shape[0], W.shape[1], dtype=torch.float32)
    getattr(lib, f"masked_{_SUFFIX[W.dtype]}")(h.data_ptr(), h.shape[0], h.shape[1], W.data_ptr(), W.shape[1],
                                                threshold, out.data_ptr())
    return out if h.dtype == torch.float32 else out.to(h.dtype)


def count_active(h: torch.Tensor, threshold: float = 0.0) -> int:
    """The rows `masked_down` would read for ``h``: entries with |h| > threshold (h != 0 at 0), in
    one pass and one call (the per-call decision of the default MLP forward). Call only when
    `usable_masked`."""
    lib = library()
    assert lib is not None
    return int(getattr(lib, f"count_{_SUFFIX[h.dtype]}")(h.data_ptr(), h.numel(), threshold))
