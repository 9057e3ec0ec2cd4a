"""Build the native parts of txfm_kernels.

Two native libraries, both with a plain C ABI (pointers, sizes, a stream) so that one build
serves every torch version and the CPU build of torch never has to know about CUDA:

* ``txfm_kernels/_cpu_<op>*.so``: ``csrc/<op>/*.cpp`` + ``csrc/common/*.cpp``, C++17 + OpenMP.
  Hot loops carry ``TXFM_CPU_DISPATCH`` (csrc/common/txfm_common.h), a GCC ``target_clones``
  that picks an AVX-512 / AVX2+FMA / portable clone at load time: one binary, fast everywhere.
* ``txfm_kernels/libtxfm_cuda_<op>.so``: ``csrc/<op>/*.cu`` + ``csrc/common/*.cu``, by nvcc.

One library per op, so that a broken op never takes the others down with it.

Environment switches (values: ``auto`` (default), ``1``/``force``, ``0``/``skip``):

``TXFM_BUILD_CPU``    build the C++ CPU kernels. ``auto``: a failed build only warns.
``TXFM_BUILD_CUDA``   build the CUDA kernels. ``auto``: only when nvcc is found, a failed
                      build only warns; ``force``: missing nvcc or a failed build is an error.
``TXFM_CUDA_ARCHS``   semicolon/comma separated SM versions, default ``80;90``; PTX of the
                      highest one is embedded too so newer GPUs JIT it.
``CUDA_HOME``         where to look for ``bin/nvcc`` before ``PATH``.

The package imports and works without either library (Triton and PyTorch paths);
``txfm_kernels.available_backends()`` says what was built and why not.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _switch(name):
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("1", "true", "yes", "on", "force"):
        return "force"
    if value in ("0", "false", "no", "off", "skip"):
        return "skip"
    if value != "auto":
        raise SystemExit(f"{name}={value!r}: use auto, 1/force or 0/skip")
    return "auto"


def _rel(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_archs():
    raw = os.environ.get("TXFM_CUDA_ARCHS", "80;90").replace(",", ";")
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in raw.split(";") if a.strip()]
    if not archs or not all(a.rstrip("a").isdigit() for a in archs):
        raise SystemExit(f"TXFM_CUDA_ARCHS={raw!r}: give SM versions such as '80;90'")
    return archs


class BuildNative(build_ext):
    """build_ext that tolerates a missing compiler (auto) and also builds the nvcc library."""

    def run(self):
        cpu_mode = _switch("TXFM_BUILD_CPU")
        if cpu_mode == "skip":
            self.extensions = []
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            if cpu_mode == "force":
                raise
            print(f"WARNING: txfm CPU kernels not built ({exc}); the torch backend will be used",
                  file=sys.stderr)
        self._build_cuda()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception:
            if _switch("TXFM_BUILD_CPU") == "force":
                raise
            print(f"WARNING: could not build {ext.name}", file=sys.stderr)

    def _out_dir(self):
        return os.path.join(os.path.dirname(self.get_ext_fullpath("txfm_kernels.x")))

    def _build_cuda(self):
        mode = _switch("TXFM_BUILD_CUDA")
        if mode == "skip":
            return
        nvcc = _find_nvcc()
        if nvcc is None:
            if mode == "force":
                raise SystemExit("TXFM_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
            print("NOTE: nvcc not found; CUDA kernels not built", file=sys.stderr)
            return
        archs = _cuda_archs()
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        # fast intrinsics, but no flush-to-zero: subnormal inputs (an fp16 logit of 5e-5, a
        # float count of 1e-40) must read as themselves, as on the CPU, not as 0
        flags = ["-O3", "-std=c++17", "--use_fast_math", "--ftz=false", "-Xcompiler", "-fPIC",
                 "-I", os.path.join(ROOT, "csrc"), "-lineinfo"] + gencode
        common = sorted(glob.glob(os.path.join(ROOT, "csrc", "common", "*.cu")))
        for op in _ops():
            sources = sorted(glob.glob(os.path.join(ROOT, "csrc", op, "*.cu")))
            if not sources:
                continue
            out = os.path.join(self._out_dir(), f"libtxfm_cuda_{op}.so")
            try:
                self._nvcc_library(nvcc, sources + common, flags, gencode, out, archs)
            except (subprocess.CalledProcessError, OSError) as exc:
                if mode == "force":
                    raise
                print(f"WARNING: CUDA kernels of {op} not built ({exc})", file=sys.stderr)

    def _nvcc_library(self, nvcc, sources, flags, gencode, out, archs):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            objs = [os.path.join(tmp, f"{i}.o") for i in range(len(sources))]

            def compile_one(pair):
                src, obj = pair
                print(f"nvcc {os.path.relpath(src, ROOT)} (sm_{', sm_'.join(archs)})")
                subprocess.run([nvcc, "-c", src, "-o", obj] + flags, check=True)

            with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
                list(pool.map(compile_one, zip(sources, objs)))
            tmp_out = out + ".tmp"
            subprocess.run([nvcc, "-shared", "-o", tmp_out] + objs + gencode, check=True)
            os.replace(tmp_out, out)  # never leave a half-written library behind

    def get_outputs(self):
        outputs = super().get_outputs()
        return outputs + sorted(glob.glob(os.path.join(self._out_dir(), "libtxfm_cuda_*.so")))


_cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
        "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]


def _ops():
    """Op folders under csrc/ (every folder but common/)."""
    return sorted(d for d in os.listdir(os.path.join(ROOT, "csrc"))
                  if d != "common" and os.path.isdir(os.path.join(ROOT, "csrc", d)))


def _cpu_extensions():
    common = sorted(glob.glob(os.path.join(ROOT, "csrc", "common", "*.cpp")))
    headers = sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.h")))
    exts = []
    for op in _ops():
        sources = sorted(glob.glob(os.path.join(ROOT, "csrc", op, "*.cpp")))
        if sources:
            exts.append(Extension(f"txfm_kernels._cpu_{op}", sources=_rel(sources + common),
                                  include_dirs=["csrc"], depends=_rel(headers),
                                  extra_compile_args=_cxx, extra_link_args=["-fopenmp"],
                                  language="c++"))
    return exts


setup(ext_modules=_cpu_extensions(), cmdclass={"build_ext": BuildNative})
