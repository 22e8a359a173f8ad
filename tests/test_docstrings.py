"""Every public function and class of the library has a docstring (scripts/docs.sh builds the
API reference from them; this test does not build it)."""

import importlib
import inspect
import pkgutil

import sparse_robust as sr


def public_modules():
    """The modules of `sr`'s namespace and the public submodules of its packages."""
    out = []
    for name in sr._MODULES:
        module = importlib.import_module(f"sparse_robust.{name}")
        out.append(module)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if not info.name.startswith("_"):
                out.append(importlib.import_module(f"{module.__name__}.{info.name}"))
    return out


def undocumented(module) -> list[str]:
    missing = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or imported from elsewhere (checked where it is defined)
        if inspect.isfunction(obj) and not obj.__doc__:
            missing.append(f"{module.__name__}.{name}")
        if inspect.isclass(obj):
            if "__doc__" not in vars(obj) or not obj.__doc__:
                missing.append(f"{module.__name__}.{name}")
            missing += [f"{module.__name__}.{name}.{method}" for method, fn in vars(obj).items()
                        if not method.startswith("_") and inspect.isfunction(fn) and not fn.__doc__]
    return missing


def test_the_public_modules_are_found():
    names = {m.__name__ for m in public_modules()}
    assert {"sparse_robust.convention", "sparse_robust.attacks.pgd", "sparse_robust.masks",
            "sparse_robust.optim", "sparse_robust.pruning.criteria"} <= names


def test_every_public_function_and_class_has_a_docstring():
    missing = [name for module in public_modules() for name in undocumented(module)]
    assert not missing, f"public names without a docstring: {missing}"


def test_an_undocumented_function_is_caught():
    import types
    module = types.ModuleType("sparse_robust.fake")
    exec("def documented():\n    'Yes.'\n\ndef bare():\n    pass\n\nclass Bare:\n    pass\n",
         module.__dict__)
    assert undocumented(module) == ["sparse_robust.fake.bare", "sparse_robust.fake.Bare"]
