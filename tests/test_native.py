"""Tests for sparse_robust.models.native: the build cache of the C++ kernels is keyed on what
the binary depends on, the CPU's instruction-set features included."""

import platform
import shutil

import pytest

from sparse_robust.models import native, winograd_cpu

KEY = dict(source="int f();", jaxlib_version="0.4.38", compiler_version="g++ 12.2.0",
           flags=native.FLAGS, cpu="flags: avx avx2 fma\n#define __AVX2__ 1")


def test_the_key_changes_with_each_thing_the_build_depends_on():
    base = native.cache_key(**KEY)
    assert native.cache_key(**KEY) == base
    changed = {"source": "int g();", "jaxlib_version": "0.4.39",
               "compiler_version": "clang 17", "flags": ("-O2",) + native.FLAGS[1:],
               "cpu": "flags: avx avx2 avx512f fma\n#define __AVX2__ 1\n#define __AVX512F__ 1"}
    keys = {name: native.cache_key(**{**KEY, name: value}) for name, value in changed.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(keys)


@pytest.mark.skipif(platform.system() != "Linux" or shutil.which("c++") is None,
                    reason="needs Linux's /proc/cpuinfo and a C++ compiler")
def test_this_cpu_names_its_features_and_another_cpu_gets_another_library(monkeypatch):
    features = native.cpu_features("c++")
    cpuinfo = open("/proc/cpuinfo").read()
    if " avx2" in cpuinfo:  # what -march=native enables shows up as the compiler's macros
        assert " avx2 " in features + " " and "#define __AVX2__ 1" in features
    if " avx512f" not in cpuinfo:
        assert "__AVX512F__" not in features
    here = native.library_path(winograd_cpu.SOURCE, "c++")
    assert here.name.startswith("winograd_cpu-")
    assert native.library_path(winograd_cpu.SOURCE, "c++") == here
    older = features.replace("#define __AVX512F__ 1", "").replace(" avx512f", "") + "\nolder"
    monkeypatch.setattr(native, "cpu_features", lambda compiler: older)
    assert native.library_path(winograd_cpu.SOURCE, "c++") != here
