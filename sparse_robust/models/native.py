"""Build, cache and register the library's C++ CPU kernels (XLA FFI handlers).

Each kernel is one C++ source beside its Python module (`winograd_cpu.cc`, `direct_cpu.cc`,
`pool_cpu.cc`, `sparse_cpu.cc`, `attacks/fab_cpu.cc`, all including `native_parallel.h`), built
on first use with the machine's C++ compiler (`$CXX`, else `c++`) against this jaxlib's FFI
headers, for this CPU (`-march=native`), and kept in `cache_dir()` under a name that hashes
everything the binary depends on (`cache_key`): the source and the headers it may include,
jaxlib's version, the compiler, the flags and the CPU's instruction-set features. The features matter because
`-march=native` emits every instruction the building CPU has: on a cluster whose nodes share a
home directory, a library built on a newer node would die of an illegal instruction on an older
one; with the features in the key, each kind of node builds and finds its own.

`load(source, targets)` builds, loads and registers the handlers as the CPU lowering of their
primitives, once per process, and answers None or why the kernel cannot run here (no compiler,
another platform, a failed build): callers fall back to XLA ops then.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import jax
import jaxlib
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-ffp-contract=fast", "-shared", "-fPIC", "-w")


def cache_dir() -> Path:
    """Where built kernels are kept: `$SPARSE_ROBUST_CACHE`, else `$XDG_CACHE_HOME/sparse_robust`,
    else `~/.cache/sparse_robust`."""
    if os.environ.get("SPARSE_ROBUST_CACHE"):
        return Path(os.environ["SPARSE_ROBUST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse_robust"


def cpu_features(compiler: str) -> str:
    """The instruction sets this build targets: the CPU's feature flags (/proc/cpuinfo) and the
    macros `compiler -march=native` predefines (`__AVX2__`, `__AVX512F__`, ...), which are what
    the compiler actually enables, including on CPUs whose flags it reads differently."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((line.split(":", 1)[1].strip() for line in lines
                      if line.split(":")[0].strip() == "flags"), "")
    except OSError:
        flags = ""
    macros = subprocess.run([compiler, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                            capture_output=True, text=True).stdout
    # Sorted: the order the compiler prints its macros in carries no meaning.
    return "flags: " + " ".join(sorted(flags.split())) + "\n" + "\n".join(sorted(
        line for line in macros.splitlines() if line.startswith("#define __")))


def cache_key(*, source: str, jaxlib_version: str, compiler_version: str,
              flags: Sequence[str], cpu: str) -> str:
    """A hash of everything a built kernel depends on (16 hex digits)."""
    parts = [source, jaxlib_version, compiler_version, " ".join(flags), cpu]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def library_path(source: Path, compiler: str) -> Path:
    """Where the build of `source` by `compiler` for this CPU is (or will be) cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout
    # The source and the headers it may include: those beside it and the shared ones beside this
    # module (native_parallel.h), which kernels in other folders include by relative path.
    headers = sorted({*source.parent.glob("*.h"), *Path(__file__).parent.glob("*.h")})
    text = "\0".join(path.read_text() for path in [source, *headers])
    key = cache_key(source=text, jaxlib_version=jaxlib.__version__,
                    compiler_version=version, flags=FLAGS, cpu=cpu_features(compiler))
    return cache_dir() / f"{source.stem}-{key}.so"


def build(source: Path, compiler: str) -> Path:
    """The cached library of `source`, built first where it is not there yet."""
    library = library_path(source, compiler)
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed, so concurrent first uses never load half a file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source),
                                 "-o", partial], capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
            raise RuntimeError(f"{compiler} failed on {source.name}: {lines[0]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


def define_primitive(name: str, abstract_eval, reference, static: Sequence[str] = ()) -> Primitive:
    """A kernel's primitive: eager calls run it compiled (`static`: its parameters), its shapes
    come from `abstract_eval`, and it lowers to `reference` (XLA ops) wherever `load` has not
    registered the kernel (off CPU, before the build, without a compiler)."""
    primitive = Primitive(name)
    compiled = jax.jit(primitive.bind, static_argnames=tuple(static))
    primitive.def_impl(lambda *args, **params: compiled(*args, **params))
    primitive.def_abstract_eval(abstract_eval)
    mlir.register_lowering(primitive, mlir.lower_fun(reference, multiple_results=False))
    return primitive


def leading_batch_rule(primitive: Primitive):
    """A vmap rule for a primitive whose leading operand dimensions are a batch it loops over:
    the mapped axis moves to the front of every operand (unmapped ones are broadcast)."""
    def rule(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)  # None: not mapped
        return primitive.bind(*(batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)),
                              **params), 0
    return rule


@functools.cache
def load(source: Path, targets: tuple) -> str | None:
    """Builds and loads `source` and registers each handler symbol of `targets`, (primitive,
    symbol) or (primitive, symbol, lowering), as an FFI target named after the primitive, and as
    the primitive's CPU lowering: the plain FFI call, or `mlir.lower_fun(lowering)` (which may
    call `jax.ffi.ffi_call(primitive.name, ...)`, e.g. with constant operands). Returns None, or
    why the kernel cannot run here."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"the kernel is built for Linux on x86-64 only, not {platform.system()} " \
               f"on {platform.machine()}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (install g++ or set $CXX)"
    try:
        library = ctypes.cdll.LoadLibrary(str(build(source, compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return f"building the kernel failed: {error}"
    for primitive, symbol, *lowering in targets:
        jax.ffi.register_ffi_target(primitive.name, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
        rule = (mlir.lower_fun(lowering[0], multiple_results=False) if lowering
                else jax.ffi.ffi_lowering(primitive.name))
        mlir.register_lowering(primitive, rule, platform="cpu")
    return None
