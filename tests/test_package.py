"""The package namespace: ``import sparse_robust as sr`` exposes the public modules, lazily, and
one version that setup.py reads too."""

import importlib
import pathlib
import subprocess
import sys

import pytest

import sparse_robust as sr

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC = ("attacks", "masks", "pruning", "optim", "objectives", "training", "evaluation", "models",
          "data")


@pytest.mark.parametrize("name", PUBLIC)
def test_public_modules_are_attributes(name):
    assert getattr(sr, name) is importlib.import_module(f"sparse_robust.{name}")
    assert name in dir(sr) and name in sr.__all__


def test_unknown_attribute_names_the_public_modules():
    with pytest.raises(AttributeError, match=r"has no attribute 'atacks'; its public modules are "
                                             r"attacks, .*training"):
        sr.atacks  # noqa: B018


def test_import_is_lazy():
    """``import sparse_robust`` loads no submodule (data pulls in tfds) until one is used."""
    code = ("import sys, sparse_robust as sr; "
            "print(sorted(m for m in sys.modules if m.startswith('sparse_robust.'))); "
            "sr.masks; print('sparse_robust.masks' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0] == "['sparse_robust._version']"
    assert out[1] == "True"


def test_version_has_one_source():
    """setup.py reports the version sparse_robust.__version__ holds."""
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    assert out == sr.__version__
    assert sr.__version__.count(".") == 2


def test_an_installed_package_holds_the_sources_of_its_native_kernels(tmp_path):
    """What a non-editable install copies (`build_py`) holds every C++ source and header the CPU
    kernels are built from on first use (`models.native`)."""
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", f"--build-lib={tmp_path}"],
                   cwd=ROOT, capture_output=True, text=True, check=True)
    sources = [path.relative_to(ROOT) for path in (ROOT / "sparse_robust").rglob("*")
               if path.suffix in (".cc", ".h")]
    # sparse_cpu.cc, winograd_cpu.cc, direct_cpu.cc, pool_cpu.cc, native_parallel.h, fab_cpu.cc
    assert len(sources) >= 6
    assert [str(path) for path in sources if not (tmp_path / path).is_file()] == []
