"""The recipe catalog: ``@recipe`` functions that return a ``run.Partial``, found by name.

A recipe module (``cupola/recipes/llm.py``, ...) decorates its functions::

    @recipe
    def llama3_8b_moe8x_online_upcycle() -> run.Partial:
        \"\"\"Upcycle Llama 3 8B into 8 experts and keep training it.\"\"\"
        return run.Partial(train, ...)

``@recipe`` also registers the function with ``run.cli.factory`` under the namespace
``cupola.recipes``, so NeMo-Run resolves it too::

    run.cli.resolve_factory("cupola.recipes", "llama3_8b_moe8x_online_upcycle")()
    run.cli.list_factories("cupola.recipes")

:func:`catalog` imports every module of ``cupola.recipes`` (except this one) the first time
it is called, so the catalog is complete without the caller knowing the modules.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import nemo_run as run

from cupola.toolkit.config import ConfigError, suggest

NAMESPACE = "cupola.recipes"

RecipeFactory = Callable[..., run.Partial]

_CATALOG: dict[str, RecipeFactory] = {}
_modules_imported = False


def recipe(fn: RecipeFactory) -> RecipeFactory:
    """Register ``fn`` in the catalog under its own name, and with ``run.cli.factory``."""
    name = fn.__name__
    known = _CATALOG.get(name)
    if known is not None and _origin(known) != _origin(fn):
        raise ConfigError(f"recipe {name!r} is defined twice: in {_origin(known)} and in {_origin(fn)}")
    # An explicit namespace files the factory under "cupola.recipes"; `target` only tells
    # nemo-run not to read the return annotation, which it cannot resolve for modules with
    # `from __future__ import annotations` and rejects for a bare `run.Partial`.
    factory = run.cli.factory(fn, target=fn, namespace=NAMESPACE, name=name)
    _CATALOG[name] = factory
    return factory


def catalog(collection: str | None = None) -> dict[str, RecipeFactory]:
    """Every registered recipe by name, sorted; imports the recipe modules on first use.
    ``collection`` (``"llm"``, ``"vlm"``, ...): only the recipes of ``cupola/recipes/<collection>.py``."""
    _import_recipe_modules()
    prefix = f"{NAMESPACE}.{collection}." if collection else ""
    return {k: v for k, v in sorted(_CATALOG.items()) if _origin(v).startswith(prefix)}


def get_recipe(name: str) -> RecipeFactory:
    recipes = catalog()
    if name not in recipes:
        raise ConfigError(
            f"unknown recipe {name!r}.{suggest(name, recipes)} Run `cupola recipes` to list all recipes."
        )
    return recipes[name]


def describe(name: str) -> str:
    """The first line of the recipe's docstring ('' when it has none)."""
    doc = (get_recipe(name).__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def _origin(fn: Callable) -> str:
    fn = getattr(fn, "wrapped", fn)
    return f"{fn.__module__}.{fn.__qualname__}"


def _import_recipe_modules() -> None:
    global _modules_imported
    if _modules_imported:
        return
    package = importlib.import_module(NAMESPACE)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry":
            importlib.import_module(f"{NAMESPACE}.{info.name}")
    _modules_imported = True
