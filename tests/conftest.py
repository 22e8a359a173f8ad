"""Tiny models and an FGSM attack shared by the core tests (defined here so the tests do not
depend on ``sparse_robust.models`` / ``sparse_robust.attacks``)."""

import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_robust import objectives


class TinyMLP(nn.Module):
    """784->300->100->10 in miniature: dense_0, dense_1, output; ReLU."""

    hidden: tuple = (6, 5)
    num_classes: int = 3
    use_bias: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, use_bias=self.use_bias, name=f"dense_{i}")(x))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="output")(x)


class TinyConvBN(nn.Module):
    """BatchNorm on the input (so its running mean has a simple reference), conv, BN, dense."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
        x = bn("input_norm")(x)
        x = nn.Conv(4, (3, 3), name="conv_0")(x)
        x = nn.relu(bn("norm_0")(x))
        return nn.Dense(self.num_classes, name="output")(jnp.mean(x, axis=(1, 2)))


def numpy_init(model, sample_input, seed):
    """Variables of ``model`` with numpy random values.

    Only the shapes come from flax (``eval_shape`` traces without compiling): an eager
    ``model.init`` compiles every initialiser op and costs seconds of CPU per model.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample_input, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.asarray(0.1 * rng.normal(size=leaf.shape), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def make_fgsm(eps: float, random_start: bool = False):
    """attack(logits_fn, x, y, key): one signed-gradient step of size eps, clipped to [0, 1]."""

    def attack(logits_fn, x, y, key):
        if random_start:
            x = jnp.clip(x + jax.random.uniform(key, x.shape, minval=-eps, maxval=eps), 0.0, 1.0)
        loss = lambda z: jnp.mean(objectives.cross_entropy(logits_fn(z), y))
        return jnp.clip(x + eps * jnp.sign(jax.grad(loss)(x)), 0.0, 1.0)

    return attack


# Fixtures hand out the helpers above (tests/ is not a package, so tests do not import it).
@pytest.fixture(scope="session", name="make_fgsm")
def _make_fgsm():
    return make_fgsm


@pytest.fixture(scope="session", name="numpy_init")
def _numpy_init():
    return numpy_init


@pytest.fixture(scope="session")
def tiny_mlp():
    return TinyMLP


@pytest.fixture(scope="session")
def tiny_conv_bn():
    return TinyConvBN


# ---------------------------------------------------------------------------- tiny real runs

TINY_CONFIG = '''
from experiments.configs import base


def get_config():
    config = base.get_config()
    config.progress = False
    config.num_trials = 1
    config.data.update(source="idx", data_dir={data_dir!r}, validation_size=100)
    config.model.name = "lenet-300-100"
    config.train.update(num_steps={num_steps}, batch_size=20)
    config.attacks.pgd.num_steps = 2
    config.train.attack = "pgd"
    config.eval.update(every=20, num_examples=100, batch_size=100, attack="pgd", attacks="fgsm",
                       sanity_examples=0)
    config.checkpoint_every = 20
    config.prune.levels = 2
    config.parallel.num_devices = 1
    return config
'''


@pytest.fixture(scope="session")
def idx_data_dir(tmp_path_factory):
    """A small "fashion_mnist" as IDX files (600 train, 200 test images of 8x8), learnable."""
    from sparse_robust import data
    path = tmp_path_factory.mktemp("idx_data")
    synthetic = data.make_synthetic(0, num_train=600, num_val=0, num_test=200,
                                    image_shape=(8, 8, 1))
    for prefix, images, labels in (("train", synthetic.train_images, synthetic.train_labels),
                                   ("t10k", synthetic.test_images, synthetic.test_labels)):
        data.write_idx(path / f"{prefix}-images-idx3-ubyte.gz",
                       np.round(255 * images[..., 0]).astype(np.uint8))
        data.write_idx(path / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return path


@pytest.fixture(scope="session")
def tiny_config_file(idx_data_dir, tmp_path_factory):
    """make(num_steps) -> the path of a config file of a tiny lottery run on idx_data_dir."""
    directory = tmp_path_factory.mktemp("configs")

    def make(num_steps: int = 40) -> str:
        path = directory / f"tiny_{num_steps}.py"
        path.write_text(TINY_CONFIG.format(data_dir=str(idx_data_dir), num_steps=num_steps))
        return str(path)

    return make


def load_config(path: str):
    """get_config() of a config file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="session", name="load_config")
def _load_config():
    return load_config


@pytest.fixture(scope="session")
def finish_tiny_run(tiny_config_file, tmp_path_factory):
    """finish(num_steps) -> (config file, workdir) of a tiny run finished through the CLI."""
    from experiments import main as cli

    def finish(num_steps: int):
        config_file = tiny_config_file(num_steps)
        path = str(tmp_path_factory.mktemp("finished") / "run")
        assert cli.run_and_report(load_config(config_file), path) == 0
        return config_file, path

    return finish


def tree_digest(path) -> dict:
    """{relative path: sha256 of contents} of every file under ``path`` (not timestamps)."""
    import hashlib
    import os
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="session", name="tree_digest")
def _tree_digest():
    return tree_digest


# ---------------------------------------------------------------------------- shared helpers

class Interrupt(Exception):
    """Raised by the train loop of `interrupt_train_loop`, as a kill would stop a run."""


@pytest.fixture
def interrupt_train_loop(monkeypatch):
    """interrupt(at) makes the at-th call of any context's train loop raise `Interrupt` (and
    returns the call counter); undone at the end of the test or with monkeypatch.undo()."""
    from sparse_robust.runs import context
    real_loop = context.Context.train_loop

    def interrupt(at: int) -> dict:
        calls = {"n": 0}

        def train_loop(self, trials=1):
            loop = real_loop(self, trials)

            def run(*args):
                calls["n"] += 1
                if calls["n"] == at:
                    raise Interrupt
                return loop(*args)
            return run

        monkeypatch.setattr(context.Context, "train_loop", train_loop)
        return calls

    interrupt.error = Interrupt
    return interrupt


def set_field(config, dotted: str, value) -> None:
    """config.a.b.c = value, from "a.b.c"."""
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


@pytest.fixture(scope="session", name="set_field")
def _set_field():
    return set_field


@pytest.fixture
def one_error_line(capsys):
    """The one line a failed CLI run printed on stderr (checked to be exactly one `error:`)."""
    def read() -> str:
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    read.clear = capsys.readouterr  # forget what was printed before the run under test
    return read


# ---------------------------------------------------------------------------- CLI processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_cli(config_file, path, *extra, env=None):
    """``python -m experiments.main`` on CPU in a subprocess, stdout and stderr piped; ``env``
    replaces the inherited environment."""
    env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "experiments.main", f"--config={config_file}",
                             f"--workdir={path}", *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def wait_for_holder(path, process, timeout=120):
    """The lock file's holder once ``process`` holds the workdir."""
    from sparse_robust.runs.layout import Layout
    lock = Layout(str(path)).lock
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        if os.path.exists(lock) and open(lock).read().strip():
            return json.loads(open(lock).read())
        time.sleep(0.05)
    raise AssertionError("the run never took the lock")


@pytest.fixture(scope="session", name="start_cli")
def _start_cli(tmp_path_factory):
    """`start_cli` whose processes share this session's compilation cache, not ~/.cache."""
    cache = str(tmp_path_factory.mktemp("compilation_cache"))

    def start(config_file, path, *extra, env=None):
        env = dict(os.environ if env is None else env)
        env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
        return start_cli(config_file, path, *extra, env=env)

    return start


@pytest.fixture(scope="session", name="wait_for")
def _wait_for():
    return wait_for


@pytest.fixture(scope="session", name="wait_for_holder")
def _wait_for_holder():
    return wait_for_holder


# A tiny MLP as a plain model fn (12 -> 10 -> 7 -> 3, ReLU, a bias on the output only) and a
# 3-class toy problem for it: the method tests (HARP, RADMM) train on these.
TOY_SHAPES = {"dense_0": (12, 10), "dense_1": (10, 7), "output": (7, 3)}


def toy_mlp_params(seed):
    rng = np.random.default_rng(seed)
    params = {n: {"kernel": jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)}
              for n, s in TOY_SHAPES.items()}
    params["output"]["bias"] = jnp.zeros(3, jnp.float32)
    return params


def toy_mlp_fn(params, model_state, x, train):
    h = x
    for layer in ("dense_0", "dense_1"):
        h = jax.nn.relu(h @ params[layer]["kernel"])
    return h @ params["output"]["kernel"] + params["output"]["bias"], model_state


def toy_mlp_data(seed, n=256):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 12)).astype(np.float32)
    y = (x[:, :4].sum(1) > x[:, 4:8].sum(1)).astype(np.int32) + (x[:, 8] > 0.7)
    return jnp.asarray(x), jnp.asarray(y, jnp.int32)
