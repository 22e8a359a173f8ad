"""Everything a run computes with, built once: data on device, model, optimizer, objective,
attacks, the evaluator, the mesh, the schedule. Pipelines receive a `Context` and never a config.

``build(...)`` makes one from library objects (plain Python, e.g. in a test or a notebook);
``from_config(config)`` makes one from a validated config and is where every check that needs the
data or the devices is made (batch vs training-set size, evaluation sizes, device counts), before
any workdir is claimed. Derived contexts (another optimizer or schedule for a fine-tuning phase,
a wider model for inverse inheritance) are memoised, so each compiles its programs once per run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sparse_robust import attacks as attacks_lib
from sparse_robust import data as data_lib
from sparse_robust import evaluation
from sparse_robust import keys as keys_lib
from sparse_robust import masks as masks_lib
from sparse_robust import models as models_lib
from sparse_robust import objectives as objectives_lib
from sparse_robust import parallel
from sparse_robust import pruning
from sparse_robust import training
from sparse_robust.models import sparse_execution, winograd_cpu
from sparse_robust.runs import hosts
from sparse_robust.runs import schema
from sparse_robust.runs.errors import ConfigError
from sparse_robust.runs.progress import Progress


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long a unit trains and how often it measures and checkpoints."""
    num_steps: int
    batch_size: int
    eval_every: int
    checkpoint_every: int


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """What is measured: periodically (on prefixes of val/test) and after a unit (whole test set)."""
    attack: Optional[attacks_lib.Attack]               # the periodic measurements' attack
    attacks: Mapping[str, attacks_lib.Attack]          # the final evaluation's, by label
    batch_size: int = 1000
    num_examples: int = 0                              # periodic prefix size, 0 = all
    final_examples: int = 0                            # final evaluation's prefix, 0 = all
    # The validation value early stopping minimises: "objective", "clean_loss", "adv_loss", or a
    # function of the validation metrics ({"accuracy", "loss", "adv_accuracy", "adv_loss"}).
    early_stop_metric: Union[str, Callable[[Mapping[str, float]], float]] = "objective"
    sanity_examples: int = 0
    diagnostics_examples: int = 0
    diagnostics_iters: int = 50


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
    dataset: data_lib.Dataset
    model: nn.Module
    optimizer: optax.GradientTransformation
    objective: objectives_lib.Objective
    schedule: Schedule
    eval: EvalPlan
    mesh: Any
    seed: int = 0
    scan: bool = True                     # lax.scan over steps, or one jitted call per step
    conv_impls: Mapping[str, str] = dataclasses.field(default_factory=dict)  # layer -> path
    augment: bool = False
    trials_at_once: int = 1
    progress: Progress = dataclasses.field(default_factory=lambda: Progress(enabled=False))
    model_fn: Optional[Callable] = None   # default: training.make_model_fn(model)
    sparse_impl: str = "dense"            # how a ticket's dense layers run in its evaluation
    make_optimizer: Optional[Callable[[float], optax.GradientTransformation]] = None
    learning_rate: Optional[float] = None
    # Shared by every context derived from the same root: compiled programs, device data.
    _shared: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_fn is None:
            model_fn = training.make_model_fn(self.model)
            model_fn.plain_model = self.model  # what ticket_evaluator may run sparse
            object.__setattr__(self, "model_fn", model_fn)

    # ---------------------------------------------------------------- compiled pieces

    def _memo(self, key, make):
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def train_loop(self, trials: int = 1):
        """The jitted train loop of this context, for 1 trial or ``trials`` stacked ones."""
        augment = data_lib.augment_crop_flip if self.augment else None
        return self._memo(("loop", self.model_fn, self.optimizer, self.objective, self.mesh,
                           self.scan, self.augment, trials > 1),
                          lambda: training.make_train_loop(
                              self.model_fn, self.optimizer, self.objective, augment, self.mesh,
                              vmap_trials=trials > 1, scan=self.scan))

    @property
    def evaluator(self) -> evaluation.Evaluator:
        return self._memo(("evaluator", self.model_fn, self.eval.batch_size, self.mesh),
                          lambda: evaluation.Evaluator(
            self.model_fn, batch_size=self.eval.batch_size, mesh=self.mesh))

    def ticket_evaluator(self, mask) -> evaluation.Evaluator:
        """The evaluator of a trained ticket under `mask`: its dense layers run from the mask's
        nonzeros where `sparse_impl` says (`models.sparse_execution`), else `evaluator`. A model
        fn other than the model's own (HYDRA's scores) is always evaluated as it is."""
        plain = getattr(self.model_fn, "plain_model", None) is self.model
        if not plain or mask is None or "sparse" not in sparse_execution.sparse_impls(
                mask, self.sparse_impl).values():
            return self.evaluator
        return evaluation.Evaluator(sparse_execution.sparse_model_fn(
            self.model, mask, self.sparse_impl), batch_size=self.eval.batch_size, mesh=self.mesh)

    @property
    def train_data(self):
        """(images, labels) replicated on the mesh; the loop gathers its batches from them."""
        return self._memo("train_data", lambda: parallel.put(
            (self.dataset.train_images, self.dataset.train_labels),
            parallel.replicated(self.mesh)))

    # ---------------------------------------------------------------- model and keys

    def init(self, key: jax.Array) -> tuple[Any, Any]:
        """(params, model_state) of a fresh model."""
        return training.init_variables(self.model, key, jnp.asarray(self.dataset.train_images[:1]))

    def abstract_variables(self):
        """Shapes and dtypes of (params, model_state), for loading checkpoints."""
        return self._memo(("abstract", self.model),
                          lambda: jax.eval_shape(self.init, jax.random.PRNGKey(0)))

    def trial_key(self, trial: int) -> jax.Array:
        return keys_lib.derive(jax.random.PRNGKey(self.seed), "trial", trial)

    def early_stop_value(self, val: Mapping[str, float]) -> float:
        """The validation value early stopping minimises (lower is better)."""
        metric = self.eval.early_stop_metric
        if callable(metric):
            return metric(val)
        if metric == "clean_loss":
            return val["loss"]
        if metric == "adv_loss":
            return val["adv_loss"]
        objective = self.objective
        if objective.name == "natural":
            return val["loss"]
        if objective.name == "mixed":
            return (1 - objective.adv_weight) * val["loss"] + objective.adv_weight * val["adv_loss"]
        return val["adv_loss"]  # madry, and trades (whose KL term is not measured here)

    # ---------------------------------------------------------------- derived contexts

    def derive(self, **changes) -> "Context":
        """This context with some fields replaced (memoised: equal changes, same context)."""
        key = ("derived", id(self)) + tuple(sorted(changes.items()))
        return self._memo(key, lambda: dataclasses.replace(self, **changes))

    def phase(self, num_steps: int = 0, learning_rate: float = 0.0) -> "Context":
        """A fine-tuning phase: ``num_steps`` steps at ``learning_rate`` (0 = this context's)."""
        steps = num_steps or self.schedule.num_steps
        changes = {}
        if steps != self.schedule.num_steps:
            changes["schedule"] = dataclasses.replace(self.schedule, num_steps=steps)
        if learning_rate and learning_rate != self.learning_rate:
            if self.make_optimizer is None:
                raise ValueError("This context has no make_optimizer: it cannot change the "
                                 "learning rate of a phase.")
            changes.update(optimizer=self._memo(("optimizer", learning_rate),
                                                lambda: self.make_optimizer(learning_rate)),
                           learning_rate=learning_rate)
        return self.derive(**changes) if changes else self


def build(dataset: data_lib.Dataset, model: nn.Module, optimizer: optax.GradientTransformation,
          objective: objectives_lib.Objective, *, num_steps: int, batch_size: int,
          eval_every: Optional[int] = None, checkpoint_every: Optional[int] = None,
          eval_plan: Optional[EvalPlan] = None, mesh=None, **options) -> Context:
    """A context from library objects, no config needed; ``options`` are other `Context` fields
    (e.g. ``seed=1``). Without ``eval_plan`` units are measured clean only."""
    eval_every = eval_every or num_steps
    return Context(
        dataset=dataset, model=model, optimizer=optimizer, objective=objective,
        schedule=Schedule(num_steps, batch_size, eval_every, checkpoint_every or eval_every),
        eval=eval_plan or EvalPlan(attack=None, attacks={}),
        mesh=mesh if mesh is not None else parallel.make_mesh(jax.devices()[:1]), **options)


# -------------------------------------------------------------------- from a config


def make_optimizer_fn(train) -> Callable[[float], optax.GradientTransformation]:
    """``config.train``'s optimizer as a function of the learning rate."""
    def make(learning_rate: float) -> optax.GradientTransformation:
        if train.optimizer == "adam":
            return optax.adam(learning_rate)
        if train.optimizer == "adamw":
            return optax.adamw(learning_rate, weight_decay=train.weight_decay)
        return optax.chain(optax.add_decayed_weights(train.weight_decay),
                           optax.sgd(learning_rate, momentum=train.momentum))
    return make


def make_mesh(parallel_config, devices=None):
    """The data-parallel mesh of ``config.parallel`` (always a mesh, also of one device: fixed
    input shardings keep every level on one compiled program). Across processes it spans the
    devices of all of them."""
    devices = jax.devices() if devices is None else devices
    if parallel_config.num_devices > len(devices):
        raise ConfigError(f"config.parallel.num_devices = {parallel_config.num_devices} is "
                          f"invalid: {len(devices)} device(s) visible; use at most that, or 0 "
                          "for all.")
    if jax.process_count() > 1 and parallel_config.num_devices not in (0, len(devices)):
        raise ConfigError(f"config.parallel.num_devices = {parallel_config.num_devices} is "
                          f"invalid with {jax.process_count()} processes: the mesh must hold "
                          f"the devices of every process; use 0 (all {len(devices)}).")
    return parallel.make_mesh(devices[:parallel_config.num_devices or len(devices)])


def uses_scan(loop: str, conv_impls: Mapping[str, str]) -> bool:
    """``config.train.loop``: "scan", "per_step", or "auto", which steps one by one only where
    XLA's own convolutions run on CPU: XLA:CPU computes their gradients many times slower inside
    a scan; the patches path is not slowed (``conv_impls``: ``models.conv_impls``' answer)."""
    if loop != "auto":
        return loop == "scan"
    return not (jax.default_backend() == "cpu" and "xla" in conv_impls.values())


def describe_compute(ctx: "Context") -> str:
    """One line: how this run's convolutions and train loop run here ("" without convolutions)."""
    if not ctx.conv_impls:
        return ""
    layers = ", ".join(f"{name} {impl}" for name, impl in ctx.conv_impls.items())
    loop = "lax.scan" if ctx.scan else "one jitted call per step"
    line = f"convolutions on {jax.default_backend()}: {layers}; train loop: {loop}"
    missing = (jax.default_backend() == "cpu" and "winograd" in ctx.conv_impls.values()
               and winograd_cpu.unavailable_reason())
    return f"{line} (no winograd_cpu kernel: {missing})" if missing else line


def load_data(config) -> data_lib.Dataset:
    data = config.data
    try:
        return data_lib.load_dataset(data.name, source=data.source,
                                     data_dir=data.data_dir or None,
                                     validation_size=data.validation_size, flatten=data.flatten,
                                     download=data.download, train_limit=data.train_limit or None)
    except data_lib.DataError:
        raise
    except ValueError as err:  # e.g. validation_size larger than the training set
        raise ConfigError(f"config.data.{err}") from None


def _check_sizes(config, dataset: data_lib.Dataset, mesh) -> None:
    train, evaluation_ = config.train, config.eval
    if train.batch_size > dataset.num_train:
        raise ConfigError(f"config.train.batch_size = {train.batch_size} is invalid: the training "
                          f"set has {dataset.num_train} images after the validation split; use at "
                          f"most {dataset.num_train}.")
    if config.data.train_limit and dataset.num_train < config.data.train_limit:
        raise ConfigError(f"config.data.train_limit = {config.data.train_limit} is invalid: only "
                          f"{dataset.num_train} training images remain after the validation split.")
    smallest = min(dataset.num_val, dataset.num_test)
    for path, value, limit in (("eval.num_examples", evaluation_.num_examples, smallest),
                               ("eval.final_examples", evaluation_.final_examples,
                                dataset.num_test),
                               ("eval.sanity_examples", evaluation_.sanity_examples,
                                dataset.num_test),
                               ("diagnostics.num_examples", config.diagnostics.num_examples,
                                dataset.num_test)):
        if value > limit:
            raise ConfigError(f"config.{path} = {value} is invalid: only {limit} images are "
                              f"available (validation {dataset.num_val}, test "
                              f"{dataset.num_test}); use at most {limit}, or 0.")
    shards = parallel.num_shards(mesh)
    for path, size in (("train.batch_size", train.batch_size),
                       ("eval.batch_size", evaluation_.batch_size)):
        if size % shards:
            raise ConfigError(f"config.{path} = {size} is invalid: it must divide across the "
                              f"{shards} devices; use a multiple of {shards}.")


def _check_model(config, model: nn.Module, dataset: data_lib.Dataset) -> None:
    """The model must accept the data's shape, and the pruning rates must name its layers."""
    try:
        params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                                jnp.zeros((1,) + dataset.image_shape))["params"]
    except ValueError as err:
        raise ConfigError(f"config.model.name = {config.model.name!r} does not fit the data "
                          f"(config.data.flatten = {config.data.flatten}): {err}") from None
    if config.prune.scope == "layerwise":
        names = masks_lib.mask_leaves(masks_lib.create_mask(params))
        try:
            pruning.layer_rates(names, schema.layer_rates(config))
        except ValueError as err:
            raise ConfigError(f"config.prune.rates: {err}") from None


def from_config(config: ml_collections.ConfigDict,
                dataset: Optional[data_lib.Dataset] = None) -> Context:
    """The context of a validated config (``schema.validate``); loads the data unless given.
    A multi-process run must have joined its processes first (``hosts.join``)."""
    mesh = make_mesh(config.parallel)
    dataset = load_data(config) if dataset is None else dataset
    _check_sizes(config, dataset, mesh)
    model = models_lib.get_model(config.model.name, num_classes=dataset.num_classes,
                                 width_multiplier=config.model.width_multiplier,
                                 conv_impl=config.model.conv_impl)
    _check_model(config, model, dataset)
    conv_impls = models_lib.conv_impls(model, dataset.train_images[:1])
    train = config.train
    attack = None if train.objective == "natural" else schema.build_attack(config, train.attack,
                                                                           "train.attack")
    objective = objectives_lib.Objective(name=train.objective, attack=attack,
                                         adv_weight=train.adv_weight,
                                         trades_beta=train.trades_beta,
                                         label_smoothing=train.label_smoothing)
    make_optimizer = make_optimizer_fn(train)
    ev = config.eval
    plan = EvalPlan(
        attack=schema.build_attack(config, ev.attack, "eval.attack"),
        attacks={label: schema.build_attack(config, label, "eval.attacks")
                 for label in schema.attack_labels(config)},
        batch_size=ev.batch_size, num_examples=ev.num_examples,
        final_examples=ev.final_examples,
        early_stop_metric=ev.early_stop_metric, sanity_examples=ev.sanity_examples,
        diagnostics_examples=config.diagnostics.num_examples,
        diagnostics_iters=config.diagnostics.num_iters)
    return Context(
        dataset=dataset, model=model, optimizer=make_optimizer(train.learning_rate),
        objective=objective,
        schedule=Schedule(train.num_steps, train.batch_size, ev.every, config.checkpoint_every),
        eval=plan, mesh=mesh, seed=config.seed,
        scan=uses_scan(train.loop, conv_impls), conv_impls=conv_impls, augment=train.augment,
        trials_at_once=config.parallel.trials_at_once,
        progress=Progress(enabled=config.progress and hosts.is_primary()),  # one set of bars
        make_optimizer=make_optimizer, learning_rate=train.learning_rate,
        sparse_impl=config.model.sparse_impl)
