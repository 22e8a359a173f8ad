"""The CLI's persistent compilation cache (`runs.compilation`): a second process reads the programs
the first one compiled and gets the same numbers; a cache folder that cannot be made is one line
before anything is created."""

import os
import subprocess
import sys

import jax
import pytest

from sparse_robust.runs import compilation, store
from sparse_robust.runs.errors import UserError
from sparse_robust.runs.layout import Layout


def sparse_kernel_available() -> bool:
    from sparse_robust.models import sparse_cpu
    return sparse_cpu.available()


def without_seconds(tree):
    """The records without their wall-clock fields (train_seconds, steps_per_second)."""
    if isinstance(tree, dict):
        return {k: without_seconds(v) for k, v in tree.items() if "second" not in k}
    if isinstance(tree, list):
        return [without_seconds(v) for v in tree]
    return tree


def read_times(cache):
    """{entry: the time JAX last read or wrote it} of a cache folder."""
    return {path.name: path.read_bytes() for path in cache.glob("*-atime")}


def test_a_second_process_reads_the_programs_and_gets_the_same_records(
        tiny_config_file, tmp_path, start_cli, tree_digest):
    config_file = tiny_config_file(40)
    cache = tmp_path / "xla"

    def run(name):
        process = start_cli(config_file, tmp_path / name, f"--compilation_cache={cache}")
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        layout = Layout(str(tmp_path / name))
        masks = {k: v for k, v in tree_digest(layout.root).items() if k.endswith("mask.npz")}
        return without_seconds(store.read_json(layout.summary)), masks

    first = run("first")
    written = read_times(cache)
    assert len(written) >= 5, sorted(os.listdir(cache))  # the train step, evaluations, attacks
    second = run("second")
    read = read_times(cache)
    reused = [name for name, stamp in written.items() if read.get(name) != stamp]
    # JAX stamps an entry each time a process reads it: most programs came from the disk.
    assert len(reused) >= len(written) // 2, (len(reused), len(written))
    assert second == first  # same records and masks, byte for byte


# One jitted call of the sparse CPU kernel (an FFI custom call), the cache on; prints its output.
KERNEL_PROGRAM = """
import sys
import jax, jax.numpy as jnp, numpy as np
from sparse_robust.models import sparse_cpu
from sparse_robust.runs import compilation
compilation.use_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this small one too
rng = np.random.default_rng(0)
pattern = sparse_cpu.Pattern.of(rng.random((64, 32)) < 0.1)
values = jnp.asarray(rng.standard_normal(pattern.nnz), jnp.float32)
x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
print(np.asarray(jax.jit(sparse_cpu.matmul, static_argnums=2)(x, values, pattern)).tobytes().hex())
"""


@pytest.mark.skipif(not sparse_kernel_available(), reason="the sparse CPU kernel cannot run here")
def test_a_program_with_a_native_kernel_runs_from_the_cache(tmp_path):
    """The kernel's FFI target is registered when the program is lowered, which JAX does before
    it looks the program up: a cached program that calls it runs in a new process."""
    def run():
        return subprocess.run([sys.executable, "-c", KERNEL_PROGRAM, str(tmp_path)],
                              capture_output=True, text=True, check=True).stdout

    first = run()
    written = read_times(tmp_path)
    assert any(name.startswith("jit_matmul") for name in written), sorted(written)
    assert run() == first
    assert read_times(tmp_path) != written  # the second process read an entry


def test_a_cache_folder_inside_a_file_is_one_line_and_nothing_is_created(
        tiny_config_file, tmp_path, start_cli):
    a_file = tmp_path / "hostname"
    a_file.write_text("not a folder")
    workdir = tmp_path / "run"
    process = start_cli(tiny_config_file(40), workdir, f"--compilation_cache={a_file}/xla")
    _, err = process.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert process.returncode == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot create --compilation_cache={a_file}/xla: {a_file} "
                               "is a file, not a folder") and "--compilation_cache=" in lines[0]
    assert not workdir.exists() and a_file.read_text() == "not a folder"


def test_the_default_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("SPARSE_ROBUST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation.default_dir() == os.path.join(str(tmp_path), "sparse_robust", "xla")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation.default_dir() == str(tmp_path / "mine")


@pytest.fixture
def restore_cache_settings():
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs", "jax_compilation_cache_max_size")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_use_compilation_cache_sets_jax_and_an_empty_path_turns_it_off(tmp_path,
                                                                      restore_cache_settings):
    folder = tmp_path / "a" / "b"
    assert compilation.use_compilation_cache(str(folder)) == str(folder) and folder.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(folder)
    assert jax.config.jax_enable_compilation_cache
    assert jax.config.jax_compilation_cache_max_size == compilation.MAX_BYTES
    assert compilation.use_compilation_cache("") is None
    assert not jax.config.jax_enable_compilation_cache
