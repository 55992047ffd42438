"""The ``cupola`` command.

    cupola recipes                                   # the catalog
    cupola run RECIPE [key=value ...] [--devices N] [--executor local|slurm] [--dryrun]

``key=value`` overrides are dotted paths into the recipe's ``run.Partial``
(``trainer.max_steps=20 optim.lr=1e-3 data.seq_len=128``); see :func:`apply_overrides`.

Other subcommands plug in through :data:`SUBCOMMANDS` (or :func:`register_subcommand`): a
name, a help line, and ``"module:function"`` naming a ``configure(parser)`` that adds the
subcommand's arguments and ``parser.set_defaults(handler=fn)`` with ``fn(args) -> int``.
The module is imported only when its subcommand runs, so ``cupola --help`` stays fast.
Nothing heavy (torch, nemo-run, the collections) is imported at module level here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cupola.toolkit.config import ConfigError, suggest

# name -> (help, "module:configure"); configure(parser) adds arguments and a `handler` default
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "recipes": ("list the recipe catalog", "cupola.toolkit.cli:configure_recipes"),
    "run": ("run a recipe locally (torchrun) or on Slurm", "cupola.toolkit.cli:configure_run"),
    "demo": (
        "online upcycling in miniature: tiny dense GPT, then dense-continued vs upcycled to 8 experts",
        "cupola.collections.llm.demo:configure",
    ),
    "export": (
        "write a GPT run's checkpoint as a Hugging Face Llama folder (safetensors)",
        "cupola.collections.llm.cli:configure_export",
    ),
    "eval": (
        "evaluate a model: perplexity, MMLU-format multiple choice; `cupola eval niah`: video needle-in-a-haystack",
        "cupola.collections.llm.eval_cli:configure",
    ),
    "world": (
        "video tokenizers: tokenize / detokenize a video, evaluate a tokenizer (PSNR, SSIM)",
        "cupola.collections.world.cli:configure",
    ),
    "curate": (
        "curate videos into webdataset shards on Ray: split, transcode, filter, caption, dedup, shard",
        "cupola.collections.world.curation.cli:configure",
    ),
    "vlm": (
        "talk to a VLM run about a video or an image (cupola vlm chat)",
        "cupola.collections.vlm.cli:configure",
    ),
    "upcycle": (
        "upcycle an HF dense checkpoint into an HF MoE checkpoint (offline)",
        "cupola.collections.llm.upcycle_cli:configure",
    ),
}


def register_subcommand(name: str, help: str, configure: str) -> None:
    """Add ``cupola <name>``; ``configure`` is ``"module:function"`` (see the module docstring)."""
    SUBCOMMANDS[name] = (help, configure)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="cupola", description="Recipes for MoE LLMs, long-video VLMs, WFMs."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (help, configure) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help, description=help)
        if name == chosen:
            _load(configure)(sub)
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if extra:
            # `cupola run R a=1 --devices 2 b=2`: argparse stops collecting overrides at the flag
            accepted = getattr(args, "accepts_overrides", False)
            unknown = [a for a in extra if not accepted or "=" not in a or a.startswith("-")]
            if unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            args.overrides = [*args.overrides, *extra]
    except SystemExit as e:  # --help, usage errors: an exit code, as from the console script
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"cupola: error: {e}", file=sys.stderr)
        return 2


def _load(spec: str) -> Callable[..., Any]:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


# --- cupola recipes ---------------------------------------------------------------------------


def configure_recipes(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(handler=_recipes)


def _recipes(args: argparse.Namespace) -> int:
    from cupola.recipes.registry import catalog, describe

    recipes = catalog()
    if not recipes:
        print("no recipes registered")
    width = max(map(len, recipes), default=0)
    for name in recipes:
        print(f"{name:<{width}}  {describe(name)}")
    return 0


# --- cupola run -------------------------------------------------------------------------------


def configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a name from `cupola recipes`")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. trainer.max_steps=20")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--devices", type=int, help="processes per node (local: torchrun workers)")
    parser.add_argument("--name", help="experiment name (default: the recipe name)")
    parser.add_argument(
        "--dryrun", action="store_true", help="print the config (and sbatch script); run nothing"
    )
    parser.add_argument("--detach", action="store_true", help="submit and return (slurm)")
    slurm = parser.add_argument_group("slurm (each also from CUPOLA_SLURM_<FLAG>, e.g. CUPOLA_SLURM_ACCOUNT)")
    slurm.add_argument("--account")
    slurm.add_argument("--partition")
    slurm.add_argument("--nodes", type=int)
    slurm.add_argument("--gpus-per-node", type=int)
    slurm.add_argument("--container-image")
    slurm.add_argument("--time")
    parser.set_defaults(handler=_run, accepts_overrides=True)


def _run(args: argparse.Namespace) -> int:
    from cupola.recipes.registry import get_recipe
    from cupola.toolkit import executors

    name = args.name or args.recipe
    partial = apply_overrides(get_recipe(args.recipe)(), args.overrides)
    given = _given(partial, args.overrides)
    # how many: a flag, else an explicit override, else (slurm) CUPOLA_SLURM_*, else the recipe's own
    recipe_devices = _recipe_count(partial, "trainer.devices")
    if args.executor == "local":
        devices = _first(args.devices, recipe_devices, 1)
        _agree(partial, given, "trainer.devices", devices, "--devices")
        _agree(partial, given, "trainer.num_nodes", 1, "a local run (one node)")
        executor = executors.local_executor(devices)
    else:
        if None not in (args.devices, args.gpus_per_node) and args.devices != args.gpus_per_node:
            raise ConfigError(f"--devices={args.devices} and --gpus-per-node={args.gpus_per_node} disagree")
        recipe_nodes = _recipe_count(partial, "trainer.num_nodes")
        executor = executors.slurm_executor(
            account=args.account,
            partition=args.partition,
            nodes=_first(args.nodes, given.get("trainer.num_nodes"), _unless_env("NODES", recipe_nodes)),
            gpus_per_node=_first(
                args.gpus_per_node,
                args.devices,
                given.get("trainer.devices"),
                _unless_env("GPUS_PER_NODE", recipe_devices),
            ),
            container_image=args.container_image,
            time=args.time,
        )
        _agree(partial, given, "trainer.devices", executor.gpus_per_node, "--gpus-per-node")
        _agree(partial, given, "trainer.num_nodes", executor.nodes, "--nodes")

    if args.dryrun:
        print(f"# recipe {args.recipe}, experiment {name!r}, executor {args.executor}")
        print(format_config(partial))
        if args.executor == "slurm":
            print(executors.render_sbatch(partial, executor, name))
        else:
            print(f"# torchrun --nproc-per-node {executor.ntasks_per_node} (python: {sys.executable})")
        return 0
    return executors.launch(partial, executor, name, detach=args.detach)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _recipe_count(partial: Any, path: str) -> int | None:
    value = _get(partial, path) if _has_field(partial, path) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _unless_env(name: str, value: Any) -> Any:
    """``value``, unless ``CUPOLA_SLURM_<name>`` is set (then slurm_executor reads the variable)."""
    from cupola.toolkit.executors import SLURM_ENV_PREFIX

    return None if os.environ.get(f"{SLURM_ENV_PREFIX}{name}") else value


def _given(partial: Any, overrides: Sequence[str]) -> dict[str, Any]:
    """The values that explicit overrides left at each overridden path."""
    keys = [item.partition("=")[0].strip() for item in overrides]
    return {key: _get(partial, key) for key in keys}


def _agree(partial: Any, given: dict[str, Any], path: str, value: int, source: str) -> None:
    """Set the recipe's ``path`` (when it has one) to the launcher's count.

    The launcher decides how many processes run; a recipe default is overwritten to match, but
    an explicit ``path=`` override that disagrees is an error: one of the two would be ignored.
    """
    if not _has_field(partial, path):
        return
    if path in given and given[path] != value:
        raise ConfigError(f"{path}={given[path]} contradicts {source} ({value}); give only one of them")
    apply_overrides(partial, [f"{path}={value}"])


# --- overrides --------------------------------------------------------------------------------


@functools.cache
def _yaml_loader() -> type:
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 needs ``1.0e-3``) and ``None`` as null."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent_float = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent_float, list("-+0123456789."))
    Loader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^None$"), ["N"])
    return Loader


def parse_value(text: str) -> Any:
    """A YAML value (``20``, ``1e-3``, ``true``, ``null``/``None``, ``[1, 2]``, ``abc``); quote to keep a string."""
    import yaml

    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except yaml.YAMLError:
        return text


def apply_overrides(partial: Any, overrides: Sequence[str]) -> Any:
    """Set ``"a.b.c=value"`` overrides on a ``run.Partial``/``run.Config`` tree in place; returns it.

    Each dotted part names an argument of the config at that level (or a list index); a plain
    dataclass value on the way becomes a ``run.Config`` of itself so its fields can be set.
    Values are parsed by :func:`parse_value`; an int given for an argument annotated ``float``
    becomes a float. An unknown key is an error that lists the valid keys at that level.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} is not key=value (e.g. trainer.max_steps=20)")
        node = partial
        for depth, part in enumerate(parts):
            _check_part(node, part, ".".join(parts[:depth]) or "<recipe>")
            if depth < len(parts) - 1:
                node = _descend(node, part)
        _set(node, parts[-1], _coerce(node, parts[-1], parse_value(text)))
    return partial


def _check_part(node: Any, part: str, where: str) -> None:
    import fiddle as fdl

    if isinstance(node, fdl.Buildable):
        keys = _valid_keys(node)
        if part in keys or node.__signature_info__.has_var_keyword:
            return
        target = getattr(node.__fn_or_cls__, "__qualname__", node.__fn_or_cls__)
        raise ConfigError(
            f"{where}: unknown key {part!r} for {target}.{suggest(part, keys)} Valid keys: {', '.join(keys)}"
        )
    if isinstance(node, (list, tuple)):
        if not (part.isdigit() and int(part) < len(node)):
            raise ConfigError(f"{where} is a list of {len(node)} items: {part!r} is not an index of it")
        return
    raise ConfigError(f"{where} is {node!r}, not a config: it has no {part!r} to set")


def _descend(node: Any, part: str) -> Any:
    import nemo_run as run

    child = _child(node, part)
    if dataclasses.is_dataclass(child) and not isinstance(child, type):
        fields = {f.name: getattr(child, f.name) for f in dataclasses.fields(child) if f.init}
        child = run.Config(type(child), **fields)
        _set(node, part, child)
    return child


def _valid_keys(node: Any) -> list[str]:
    import fiddle as fdl

    args = fdl.ordered_arguments(node, include_defaults=True, include_unset=True, include_positional=False)
    return [k for k in args if isinstance(k, str)]


def _child(node: Any, part: str) -> Any:
    import fiddle as fdl

    if isinstance(node, (list, tuple)):
        return node[int(part)]
    return fdl.ordered_arguments(node, include_defaults=True, include_unset=True).get(part)


def _set(node: Any, part: str, value: Any) -> None:
    if isinstance(node, list):
        node[int(part)] = value
    elif isinstance(node, tuple):
        raise ConfigError(f"cannot set item {part} of a tuple; override the whole tuple instead")
    else:
        setattr(node, part, value)


def _coerce(node: Any, key: str, value: Any) -> Any:
    """int → float where the argument is annotated ``float`` (``optim.lr=1`` stays a float)."""
    import typing

    if not isinstance(value, int) or isinstance(value, bool) or isinstance(node, (list, tuple)):
        return value
    try:
        hint = typing.get_type_hints(node.__fn_or_cls__).get(key)
    except Exception:  # unresolvable annotations: leave the value as parsed
        return value
    options = typing.get_args(hint) or (hint,)
    return float(value) if float in options and int not in options else value


def _has_field(partial: Any, path: str) -> bool:
    import fiddle as fdl

    node = partial
    for part in path.split("."):
        if not isinstance(node, fdl.Buildable) or part not in _valid_keys(node):
            return False
        node = _child(node, part)
    return True


def _get(partial: Any, path: str) -> Any:
    node = partial
    for part in path.split("."):
        node = _child(node, part)
    return node


# --- printing ---------------------------------------------------------------------------------


def format_config(cfg: Any, indent: int = 0) -> str:
    """A YAML-like view of a fiddle config with every argument, defaults included (unset: ???)."""
    import fiddle as fdl

    pad = "  " * indent
    target = cfg.__fn_or_cls__
    lines = [f"{pad}_target_: {target.__module__}.{target.__qualname__}"]
    if isinstance(cfg, fdl.Partial):
        lines.append(f"{pad}_partial_: true")
    args = fdl.ordered_arguments(cfg, include_defaults=True, include_unset=True, include_positional=False)
    for key, value in args.items():
        lines.extend(_format_item(f"{pad}{key}:", value, indent))
    return "\n".join(lines)


def _format_item(head: str, value: Any, indent: int) -> list[str]:
    import fiddle as fdl

    if isinstance(value, fdl.Buildable):
        return [head, format_config(value, indent + 1)]
    if isinstance(value, (list, tuple)) and any(isinstance(v, fdl.Buildable) for v in value):
        lines = [head]
        for item in value:
            lines.extend(_format_item(f"{'  ' * (indent + 1)}-", item, indent + 2))
        return lines
    return [f"{head} {_scalar(value)}"]


def _scalar(value: Any) -> str:
    import fiddle as fdl
    import yaml

    if value is fdl.NO_VALUE:
        return "???"
    try:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
    except yaml.YAMLError:
        return repr(value)


if __name__ == "__main__":
    sys.exit(main())
