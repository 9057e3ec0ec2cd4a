"""What every op of txfm_kernels needs, in one place.

* **Backends**: which implementation can run here (:func:`available_backends`), turning
  ``backend="auto" | "triton" | "cuda" | "cpu" | "torch"`` into a concrete one
  (:func:`resolve_backend`; :func:`resolve` is its memoised, torch.compile-safe form used by
  the ops), the lazy import of an op's backend module (:func:`backend_module`) and whether
  Triton runs under its CPU interpreter (:func:`interpreted`).
* **Native libraries**: each op has a C++/OpenMP library ``_cpu_<op>*.so`` and a CUDA library
  ``libtxfm_cuda_<op>.so`` (built by ``setup.py``) with a plain C ABI called through ctypes,
  so one build works with every torch version; ctypes releases the GIL during each call. Every
  entry point takes one argument struct (``txfm_<op>_args`` in ``csrc/<op>/<op>_math.h``),
  mirrored by a :class:`NativeArgs` subclass in ``txfm_kernels/<op>/native.py``;
  :func:`native_function` binds an entry point once and checks the struct's size against the
  library's. ``TXFM_DISABLE_NATIVE=cpu,cuda`` (either or both) ignores a built library.
* **Dtype codes** of the C ABI (:data:`DTYPE_CODE`, ``txfm_dtype`` in
  ``csrc/common/txfm_common.h``).
* **Argument checks**, one style for every op: ``TypeError`` for a wrong kind of argument,
  ``ValueError`` for a wrong value, each message starting with the op's name and naming the
  argument. Checks of Python numbers work on the symbolic floats and ints of
  ``torch.compile(dynamic=True)`` (:func:`check_number`); checks that read tensor values run
  only outside tracing (:func:`traced`).
"""
from __future__ import annotations

import ctypes
import functools
import glob
import importlib
import importlib.util
import math
import numbers
import os
from dataclasses import dataclass
from typing import Union

import torch
from torch._C import _functorch
from torch.autograd import forward_ad
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
OPS = ("poisson", "tokens", "sample")
# what users call each op: its public function (messages name it), also accepted as ``op``
OP_FUNCTIONS = {"poisson": "rectified_tanh_poisson_nll", "tokens": "gene_tokens",
                "sample": "masked_sample"}
# other public functions on an op's kernels (messages name the one the caller used)
OP_ALIASES = {"poisson_nll_loss": "poisson"}


def canonical_op(op: str) -> str:
    """``op`` as one of :data:`OPS`; a public function's name is accepted too."""
    for short, function in OP_FUNCTIONS.items():
        if op in (short, function):
            return short
    if op in OP_ALIASES:
        return OP_ALIASES[op]
    raise ValueError(f"op={op!r} is not one of {OPS} (or their functions "
                     f"{tuple(OP_FUNCTIONS.values()) + tuple(OP_ALIASES)})")

_HERE = os.path.dirname(os.path.abspath(__file__))
_TRACING_TENSORS = (FakeTensor, FunctionalTensor)
_REBUILD = "reinstall with `pip install -e .` (see setup.py for TXFM_BUILD_CPU / TXFM_BUILD_CUDA)"

# A number argument of a custom op: torch.library types it "Scalar", which Dynamo passes on
# symbolically (a ``float`` argument is specialised: one recompilation per value).
Number = Union[int, float, bool]

# Element type codes of the C ABI: enum txfm_dtype in csrc/common/txfm_common.h.
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3,
              torch.int32: 4, torch.int16: 5, torch.uint16: 6, torch.uint8: 7}


# ---------------------------------------------------------------------------------------------
# Native libraries
# ---------------------------------------------------------------------------------------------
def _disabled(kind: str) -> bool:
    raw = os.environ.get("TXFM_DISABLE_NATIVE", "")
    return kind in {p.strip().lower() for p in raw.split(",")}


@functools.lru_cache(maxsize=None)
def cpu_library(op: str) -> tuple[ctypes.CDLL | None, str]:
    """``(library, detail)`` of op's C++ kernels; library is None when unavailable, detail says why."""
    if _disabled("cpu"):
        return None, "disabled by TXFM_DISABLE_NATIVE"
    paths = sorted(glob.glob(os.path.join(_HERE, f"_cpu_{op}.*so")))
    if not paths:
        return None, f"C++ CPU library of {op} not built; {_REBUILD}"
    try:
        lib = ctypes.CDLL(paths[0])
    except OSError as exc:
        return None, f"C++ CPU library of {op} failed to load ({exc}); {_REBUILD}"
    isa = {2: "AVX-512", 1: "AVX2+FMA", 0: "portable"}[lib.txfm_cpu_isa_level()]
    return lib, f"C++/OpenMP, {isa}, {lib.txfm_cpu_max_threads()} threads"


@functools.lru_cache(maxsize=None)
def cuda_library(op: str) -> tuple[ctypes.CDLL | None, str]:
    """``(library, detail)`` of op's CUDA kernels; None when not built or no GPU is present."""
    if _disabled("cuda"):
        return None, "disabled by TXFM_DISABLE_NATIVE"
    path = os.path.join(_HERE, f"libtxfm_cuda_{op}.so")
    if not os.path.exists(path):
        return None, (f"CUDA library of {op} not built (TXFM_BUILD_CUDA=0, or no nvcc at install "
                      f"time); {_REBUILD}")
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return None, f"CUDA library of {op} failed to load ({exc})"
    lib.txfm_cuda_error_string.restype = ctypes.c_char_p
    count = ctypes.c_int(0)
    err = lib.txfm_cuda_device_count(ctypes.byref(count))
    if count.value == 0:
        why = lib.txfm_cuda_error_string(err).decode()
        return None, f"CUDA library built but no usable GPU ({why})"
    return lib, f"CUDA runtime {lib.txfm_cuda_runtime_version()}, {count.value} device(s)"


def built_ops() -> dict[str, set[str]]:
    """Which native libraries exist on disk: ``{"cpu": {ops}, "cuda": {ops}}``."""
    names = os.listdir(_HERE)
    return {"cpu": {n[len("_cpu_"):].split(".")[0] for n in names if n.startswith("_cpu_") and n.endswith(".so")},
            "cuda": {n[len("libtxfm_cuda_"):-3] for n in names if n.startswith("libtxfm_cuda_") and n.endswith(".so")}}


class NativeArgs(ctypes.Structure):
    """Base of the ctypes mirrors of the C argument structs; ``_c_name_`` is the C name."""

    _c_name_ = ""


_C_TYPES = {"int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64, "uint32_t": ctypes.c_uint32,
            "float": ctypes.c_float, "double": ctypes.c_double}


def c_struct(c_name: str, members: str) -> type[NativeArgs]:
    """The :class:`NativeArgs` mirror of C struct ``c_name`` from its member declarations as
    they stand in the header (``"const void* z; int64_t B, G; ..."``, comments allowed): every
    pointer becomes a ``c_void_p``, scalars map through ``int32_t int64_t uint32_t float
    double``. Field order, types and hence padding are C's, so a copy of the header's lines
    is the whole declaration; :func:`native_function` then checks the size against the
    library's."""
    fields = []
    code = " ".join(line.split("//")[0] for line in members.splitlines())
    for decl in filter(str.strip, code.split(";")):
        words = decl.replace("*", " * ").replace(",", " , ").split()
        words = [w for w in words if w != "const"]
        ctype = ctypes.c_void_p if "*" in words else _C_TYPES[words[0]]
        names = [w for w in words[1:] if w not in ("*", ",")]
        fields += [(name, ctype) for name in names]
    return type(c_name, (NativeArgs,), {"_c_name_": c_name, "_fields_": fields})


@functools.lru_cache(maxsize=None)
def native_function(kind: str, op: str, name: str, args_type: type | None, *extra: type,
                    restype: type = ctypes.c_int):
    """``(library, fn)``: entry point ``name`` of op's ``kind`` ("cpu" or "cuda") library, bound
    once as ``fn(args: args_type*, *extra) -> restype``. With an ``args_type`` it first checks
    that the library was built from the same struct (one from other sources would read
    garbage); ``None`` binds a plain positional signature ``fn(*extra)``."""
    lib, detail = (cpu_library if kind == "cpu" else cuda_library)(op)
    if lib is None:
        raise RuntimeError(f"{op}: backend={kind!r} is not available: {detail}")
    argtypes = list(extra)
    if args_type is not None:
        size_fn = getattr(lib, f"{args_type._c_name_}_size", None)
        if size_fn is not None:
            size_fn.restype = ctypes.c_int64
        if size_fn is None or size_fn() != ctypes.sizeof(args_type):
            raise RuntimeError(f"{op}: the {kind} library was built from other sources than "
                               f"this txfm_kernels ({args_type._c_name_} differs); {_REBUILD}")
        argtypes.insert(0, ctypes.POINTER(args_type))
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return lib, fn


def ptr(t: torch.Tensor | None) -> int:
    """Address of a tensor's data for a ``c_void_p`` field (0 for None)."""
    return 0 if t is None else t.data_ptr()


def cuda_stream(device: torch.device) -> ctypes.c_void_p:
    """The current torch stream of ``device`` as a ``cudaStream_t``."""
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


# the public function of each op's native entry points (their messages name the op)
_PUBLIC = {"poisson": "rectified_tanh_poisson_nll or poisson_nll_loss",
           "gene_tokens": "gene_tokens", "masked_sample": "masked_sample"}


def _rejected(op: str) -> str:
    """Why a native kernel refuses its argument struct, and what to do: the public function
    checks every argument first and names the bad one (the ``torch.ops.txfm`` ops check only
    shapes, dtypes and devices)."""
    public = _PUBLIC.get(op, op)
    return (f"{op}: the native kernel rejected its arguments (a size, count or pointer out of "
            f"range); call txfm_kernels.{public}, which checks them and names the bad one, or "
            f"report a bug if that is what failed")


def check_cpu_status(status: int, op: str) -> None:
    """Raise for a C++ entry point's status (``txfm_status``; op-specific codes are the op's)."""
    if status == 1:
        raise ValueError(_rejected(op))
    if status != 0:
        raise ValueError(f"{op}: the C++ kernel found invalid input data (status {status})")


def check_cuda_status(code: int, op: str, lib: ctypes.CDLL) -> None:
    """Raise for a CUDA entry point's ``cudaError_t`` (our entry points return
    ``cudaErrorInvalidValue``, 1, for arguments they refuse)."""
    if code != 0:
        msg = lib.txfm_cuda_error_string(code).decode()
        if code == 1:
            raise ValueError(f"{_rejected(op)} ({msg}, cudaError 1)")
        raise RuntimeError(f"{op}: CUDA kernel failed: {msg} (cudaError {code})")


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here, and on which devices; ``detail`` says why or why not."""

    name: str
    available: bool
    devices: tuple[str, ...]
    detail: str


# Triton picks its interpreter when @triton.jit functions are defined, at txfm_kernels' import:
# setting TRITON_INTERPRET=1 afterwards leaves compiled-mode kernels that fail on CPU tensors.
_TRITON_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_status() -> tuple[bool, tuple[str, ...], str]:
    if importlib.util.find_spec("triton") is None:
        return False, (), "triton is not installed: `pip install triton` (or txfm[triton])"
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if _TRITON_INTERPRET_AT_IMPORT:
        devices.append("cpu")
    elif not devices and os.environ.get("TRITON_INTERPRET") == "1":
        return False, (), ("TRITON_INTERPRET=1 was set after txfm_kernels was imported; set it "
                           "before the import (triton chooses its interpreter when the kernels "
                           "are defined)")
    if not devices:
        return False, (), ("triton is installed but there is no CUDA GPU; on CPU tensors it only "
                           "runs under TRITON_INTERPRET=1 (set before importing txfm_kernels)")
    import triton

    return True, tuple(devices), f"triton {triton.__version__} on {', '.join(devices)}" + (
        " (interpreter)" if "cpu" in devices else "")


def available_backends(op: str | None = None) -> dict[str, BackendInfo]:
    """Every backend with whether it is usable here and why (not).

    ``op`` (``"poisson"``, ``"tokens"``, ``"sample"``) asks about that op's native libraries;
    without it a native backend counts as available when every op's library is.

    >>> {k: v.available for k, v in available_backends().items()}  # doctest: +SKIP
    {'triton': False, 'cuda': False, 'cpu': True, 'torch': True}
    """
    ops = OPS if op is None else (canonical_op(op),)
    t_ok, t_dev, t_detail = _triton_status()
    out = {"triton": BackendInfo("triton", t_ok, t_dev, t_detail)}
    for kind, loader in (("cuda", cuda_library), ("cpu", cpu_library)):
        found = [(o,) + loader(o) for o in ops]
        missing = [f"{o}: {detail}" for o, lib, detail in found if lib is None]
        ok = not missing
        detail = found[0][2] if ok else "; ".join(missing)
        if kind == "cuda" and ok and not torch.cuda.is_available():
            ok, detail = False, f"{detail}; but this torch build sees no GPU"
        out[kind] = BackendInfo(kind, ok, (kind,) if ok else (), detail)
    out["torch"] = BackendInfo("torch", True, ("cpu", "cuda"), f"eager PyTorch {torch.__version__}")
    return {k: out[k] for k in ("triton", "cuda", "cpu", "torch")}


def resolve_backend(backend: str, device: torch.device, op: str,
                    gpu_order: tuple[str, ...] = ("cuda", "triton")) -> str:
    """Turn ``backend`` into a concrete one for op's tensors on ``device`` or raise saying why not.

    ``op`` is one of :data:`OPS` or a public function's name (``poisson_nll_loss`` too), which
    messages then name; ``gpu_order`` is its preference among GPU backends for ``"auto"`` (CPU
    tensors: ``cpu``, then ``torch``). Raises ``ValueError`` for an unknown backend, op or
    device, ``RuntimeError`` for a backend that cannot run op's tensors here.
    """
    short = canonical_op(op)
    op = op if op != short else OP_FUNCTIONS[short]  # the function messages name
    infos = available_backends(short)
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{op}: device {device!r} is not a torch device (use 'cpu', 'cuda' or "
                         f"'cuda:N')") from exc
    check_choice(backend, "backend", BACKENDS, op)
    if backend == "auto":
        order = gpu_order + ("torch",) if kind == "cuda" else ("cpu", "torch")
        for name in order:
            if infos[name].available and kind in infos[name].devices:
                return name
        return "torch"
    info = infos[backend]
    if not info.available:
        detail = info.detail.removeprefix(f"{short}: ")  # the op is named once
        raise RuntimeError(f"{op}: backend={backend!r} is not available ({detail}); use "
                           f"backend='auto' (the fastest one available) or 'torch' (eager)")
    if kind not in info.devices:
        raise RuntimeError(f"{op}: backend={backend!r} runs on {', '.join(info.devices)} tensors, "
                           f"got tensors on {kind}; move them or use backend='auto'")
    return backend


@functools.lru_cache(maxsize=None)
def _resolve_cached(backend: str, device_type: str, op: str, interpret: str | None,
                    disabled: str | None) -> str:
    return resolve_backend(backend, torch.device(device_type), op)


@torch.compiler.assume_constant_result
def resolve(backend: str, device_type: str, op: str) -> str:
    """:func:`resolve_backend`, memoised per environment (it probes libraries: tens of us per
    call otherwise). Under torch.compile it runs once at trace time and the graph keeps its
    answer: a later change of ``TXFM_DISABLE_NATIVE`` does not reach a compiled graph."""
    if backend == "torch":  # runs everywhere: no environment to read
        return backend
    return _resolve_cached(backend, device_type, op, os.environ.get("TRITON_INTERPRET"),
                           os.environ.get("TXFM_DISABLE_NATIVE"))


def op_backend(backend: str, device_type: str, op: str) -> str:
    """The backend an op's body runs: a concrete name as it comes (the public function resolved
    and checked it), ``"auto"`` resolved (a direct call of the ``torch.library`` op)."""
    return backend if backend != "auto" else resolve(backend, device_type, op)


_BACKEND_FILES = {"triton": "triton", "cuda": "native", "cpu": "native", "torch": "reference"}
_backend_modules: dict = {}


def backend_module(package: str, backend: str):
    """The module of op ``package`` (e.g. ``"txfm_kernels.poisson"``) that holds a concrete
    ``backend``: ``triton.py``, ``native.py`` (cpu and cuda) or ``reference.py``. Imported on
    first use, so that Triton is only imported (and its kernels compiled) when it runs."""
    module = _backend_modules.get((package, backend))
    if module is None:
        module = importlib.import_module(f"{package}.{_BACKEND_FILES[backend]}")
        _backend_modules[(package, backend)] = module
    return module


def interpreted(device: torch.device) -> bool:
    """Whether Triton kernels on ``device`` run under the interpreter (CPU tensors: tests)."""
    return device.type != "cuda"


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
def traced(*tensors) -> bool:
    """Inside torch.compile / AOT tracing: tensor values are unknown (fake or functional
    tensors), so checks that read them must not run."""
    return torch.compiler.is_compiling() or any(isinstance(t, _TRACING_TENSORS) for t in tensors)


def transformed(*tensors) -> bool:
    """Whether a tensor is wrapped by a ``torch.func`` transform (``vmap``, ``grad``; also the
    batched gradients of ``autograd.grad(is_grads_batched=True)``) or carries a forward-mode
    tangent: its values cannot be read (``.item()``) and a fused kernel cannot take it.
    False under torch.compile, which traces transforms itself (and cannot trace this test)."""
    if torch.compiler.is_compiling():
        return False
    return any(t is not None and (_functorch.is_functorch_wrapped_tensor(t)
                                  or _functorch.is_legacy_batchedtensor(t)  # is_grads_batched
                                  or _carries_tangent(t))
               for t in tensors)


def _carries_tangent(t: torch.Tensor) -> bool:
    """``t`` is a forward-mode dual tensor (inside a dual level: torch.func.jvp opens one)."""
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None


def renamed_padding(key_padding_mask, pad_mask, op: str, stacklevel: int = 3):
    """``key_padding_mask``, or the deprecated ``pad_mask`` it replaced (torch's name for the
    same mask: True = padding), with a ``DeprecationWarning`` pointing ``stacklevel`` frames
    up (the caller of a function: 3; of a module's forward: 5); both at once is a TypeError.
    Under torch.compile the warning is left out (dynamo cannot trace it; eager runs show it).
    """
    if pad_mask is None:
        return key_padding_mask
    if key_padding_mask is not None:
        raise TypeError(f"{op}: give key_padding_mask only (pad_mask is its deprecated name)")
    if not torch.compiler.is_compiling():
        import warnings

        warnings.warn(f"{op}: pad_mask= is deprecated, pass key_padding_mask= (the same mask, "
                      f"torch's name: True = padding)", DeprecationWarning,
                      stacklevel=stacklevel)
    return pad_mask


def check_choice(value, name: str, choices: tuple, op: str) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name}={value!r} is not one of {choices}")


def check_tensor(t, name: str, op: str, dtypes: tuple | None = None, desc: str = "",
                 hint: str = "") -> None:
    """``t`` is a tensor (``TypeError`` otherwise) of one of ``dtypes`` (when given); ``desc``
    words the allowed dtypes, ``hint`` says how to fix it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense tensor, got layout {t.layout}; convert it "
                        "with .to_dense()")
    if dtypes is not None and t.dtype not in dtypes:
        desc = desc or " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {desc}, got {t.dtype}"
                        + (f"; {hint}" if hint else ""))


def check_reverse_mode_only(op: str, hint: str = "", *, vmap: bool = True, **tensors) -> None:
    """``NotImplementedError`` for forward-mode AD (``torch.func.jvp``, ``forward_ad`` dual
    tensors) and ``torch.func`` gradient transforms on ``tensors`` (None skipped): a
    ``torch.library`` op with only a backward formula would drop the tangent silently (zeros)
    or fail inside PyTorch. Ordinary autograd passes, and so does ``vmap`` unless ``vmap`` is
    False (an ``autograd.Function`` without a vmap rule, which PyTorch refuses in its own
    words)."""
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if t is None:
            continue
        if _carries_tangent(t):
            raise NotImplementedError(f"{op}: forward-mode AD (torch.func.jvp, forward_ad) is not "
                                      f"supported ({name} carries a tangent); use reverse mode: "
                                      f".backward() or torch.autograd.grad{hint}")
        if _functorch.is_gradtrackingtensor(t):
            raise NotImplementedError(f"{op}: torch.func gradient transforms (grad, jacrev, "
                                      f"jacfwd) are not supported; use .backward() or "
                                      f"torch.autograd.grad{hint}")
        if not vmap and _functorch.is_batchedtensor(t):
            raise NotImplementedError(f"{op}: torch.func.vmap is not supported ({name} is "
                                      f"batched); loop over the batch, or fold it into the "
                                      f"rows{hint}")


def check_same_device(op: str, first: str, **others) -> None:
    """Every tensor of ``others`` (None skipped) is on the device of ``others[first]``, a tensor
    or, where the caller holds only its device, a ``torch.device``."""
    named = {k: v for k, v in others.items() if v is not None}
    ref = named.pop(first)
    device = ref.device if isinstance(ref, torch.Tensor) else ref
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {device}; "
                             f"move them to the same device")


def check_int(value, name: str, op: str, low: int, high: int | None = None,
              what: str = "") -> None:
    """``value`` is an int (not a bool) with ``low <= value`` (``< high`` when given)."""
    # numbers.Integral: numpy integers too (a size read from an array), never a bool
    ok = isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)
    if ok:
        ok = value >= low and (high is None or value < high)
    if not ok:
        span = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{op}: {name} must be an int {span}{what}, got {shown(value)}")


def shown(value) -> str:
    """``repr(value)`` for an error message. An int being traced by ``torch.compile`` (symbolic
    under ``dynamic=True``) is left out: dynamo cannot format a symbol, and trying stops tracing
    with an error that hides the whole message."""
    if isinstance(value, torch.SymInt) or (torch.compiler.is_compiling()
                                           and isinstance(value, int)):
        return "a traced int (call the function eagerly to see its value)"
    return repr(value)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory that tensors on ``device`` can use at most: the GPU's total memory (no
    sync), the host's RAM for CPU tensors; None when it cannot be told."""
    return _device_memory(device.type, device.index)


@functools.lru_cache(maxsize=None)
def _device_memory(kind: str, index: int | None) -> int | None:
    if kind == "cuda":
        return torch.cuda.get_device_properties(torch.device(kind, index)).total_memory
    if kind != "cpu":
        return None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf here
        return None


def check_fits(nbytes: int, device: torch.device, op: str, what: str, hint: str) -> None:
    """``ValueError`` naming ``what`` (the sizes) and ``hint`` (the fix) when ``nbytes`` of
    new tensors exceed all of ``device``'s memory: one clear line instead of the allocator's.
    Call it outside torch.compile (a symbolic size checks nothing)."""
    if not isinstance(nbytes, int):
        return
    total = device_memory(device)
    if total is not None and nbytes > total:
        raise ValueError(f"{op}: {what} needs about {nbytes / 2**30:,.1f} GiB, more than the "
                         f"{total / 2**30:,.1f} GiB of {device.type} memory here; {hint}")


def as_int(value):
    """A numpy (or other ``numbers.Integral``) integer as a Python int, which the custom ops
    take; anything else as it is (a bool, a symbolic int, or a wrong type for the checks)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (int, torch.SymInt)):
        return int(value)
    return value


_CHECK_MESSAGES = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def check_number(value, name: str, op: str, what: str, *, low: float = -math.inf,
                 high: float = math.inf, low_open: bool = False) -> float:
    """``value`` is a real number with ``low <(=) value <= high``; returns it as a float.
    ``what`` words the condition for the message (``f"{name} must be {what}"``).

    NaN fails every bound and infinities fail finite ones. Under torch.compile the number may
    be symbolic (``dynamic=True`` turns Python floats into graph inputs): the check is then
    ``torch._check``, a runtime assert of the compiled graph (no graph break, no recompilation
    per value, a constant message); outside tracing a ``ValueError`` names the value.
    """
    if torch.compiler.is_compiling() or isinstance(value, (torch.SymFloat, torch.SymInt)):
        v = torch.sym_float(value)
        msg = f"{op}: {name} must be {what}"
        for ok in (v > low if low_open else v >= low, v <= high, v == v):  # v == v: NaN
            if _CHECK_MESSAGES:
                torch._check(ok, lambda: msg)
            else:
                # torch < 2.13 cannot trace a message argument here, None included (a graph
                # break, an error under fullgraph=True): torch's own message instead
                torch._check(ok)
        return v
    # float() would take a one-element tensor (dropping its autograd: a silent constant) or a
    # numeric string; both are a caller's mistake here
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        hint = (" (a Python float: it is a constant of the op, not a learnable parameter; use "
                ".item() to pass a tensor's value)" if isinstance(value, torch.Tensor) else "")
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}{hint}")
    v = float(value)
    if not ((v > low if low_open else v >= low) and v <= high):  # False for NaN
        raise ValueError(f"{op}: {name} must be {what}, got {value}")
    return v


def check_row_ids(ids: torch.Tensor, n_rows: int, what: str) -> None:
    """``ids`` (row indices into a table of ``n_rows`` rows) lie in ``[0, n_rows)``: a
    ``ValueError`` naming them otherwise. Reads the values, so only on CPU tensors outside
    tracing (on a GPU it would cost a device synchronisation; the kernels there give NaN or
    clamp instead, as their docstrings say)."""
    if ids.device.type != "cpu" or ids.numel() == 0 or traced(ids):
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n_rows:
        raise ValueError(f"{what} must lie in [0, {n_rows}) (rows of the [D, G] mask), got "
                         f"values in [{lo}, {hi}]")
