"""Command-line overrides of ``python -m monai.bundle run`` checked against the configs, once for every config.

MONAI adds any ``--key value`` it is given to the config, so a mistyped key (``--max_epoch 1``,
``--input_slide /x.tif``) is silently ignored and the run does something else than asked, and an ill-typed value
(``--max_epochs abc``) fails late with an unrelated ``TypeError``. Every bundle config calls
:func:`check_cli_overrides` as the first entry of ``initialize``::

    "initialize": ["$monai_wsi_ext.config_check.check_cli_overrides()", ...]

It reads ``sys.argv`` of a ``python -m monai.bundle run`` (or ``run_workflow``, also under ``torchrun``) process,
finds ``--config_file`` (one path, a list literal or comma-separated paths, as ``monai.bundle run`` takes it) and
``--args_file``, merges the config files in order and compares every override with the merged ids (top-level ids
and ``#``-paths such as ``train#trainer#max_epochs``):

- an id no config defines is an error that lists the closest known ids;
- when the config's value is a literal ``int``, ``float``, ``bool`` or a path (a string option named ``*_dir``,
  ``*_path``, ``*_file``, ``*_ckpt``, ``*_root``, or whose value looks like a file name), the override, read as
  ``monai.bundle``/fire reads it, must be of that type (``None`` is always accepted, ints are accepted for floats,
  ``0``/``1`` for bools; the strings ``true``/``false`` are refused for bools because fire passes them on as
  strings, which are always true);
- a ``null`` default accepts anything, and values that are expressions, references or macros (``$...``, ``@...``,
  ``%...``) are not type-checked.

``monai.bundle run``'s own arguments (``run_id``, ``config_file``, ``meta_file``, ``args_file``, ``logging_file``,
``tracking``...) are not overrides. In any other process (tests, scripts that call ``monai.bundle.run`` from
Python) the check does nothing; :func:`check_overrides` checks an explicit list of files and overrides.

In a ``monai.bundle`` process the check also installs :func:`install_error_hook`: a run that stops on one of this
package's errors (a slide batch with failures, a bad setting found in ``initialize``) prints the error's own line
and exits with status 1, without the traceback that ends in MONAI's ``RuntimeError: Failed to evaluate
ConfigExpression`` (``MONAI_WSI_EXT_TRACEBACK=1`` shows it).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_wsi_ext.errors import ConfigError

__all__ = ["check_cli_overrides", "check_overrides", "parse_bundle_argv", "known_ids", "install_error_hook",
           "package_error"]

#: subcommands of ``python -m monai.bundle`` whose extra ``--key value`` pairs are config overrides
RUN_COMMANDS = ("run", "run_workflow")
_FALLBACK_OWN_ARGS = ("run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
                      "args_file", "workflow_name", "workflow_type", "properties_path")
_PATH_NAME = re.compile(r"(^|_)(dir|path|file|ckpt|root)$")
_FILE_LIKE = re.compile(r"\.(pt|pth|ts|json|ya?ml|csv|npz|npy|tif|tiff|svs|png|xml|geojson)$", re.IGNORECASE)


def _own_args() -> tuple[list[str], set[str]]:
    """``monai.bundle run``'s positional parameter order and every argument name MONAI itself consumes."""
    try:
        from monai.bundle import scripts, workflows

        params = list(inspect.signature(scripts.run).parameters.values())
        order = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        names = set(order)
        for fn in (scripts.run_workflow, scripts.create_workflow, workflows.ConfigWorkflow.__init__):
            names.update(p.name for p in inspect.signature(fn).parameters.values()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")
        return order, names
    except Exception:  # pragma: no cover - an older/newer MONAI without these names
        return list(_FALLBACK_OWN_ARGS[:8]), set(_FALLBACK_OWN_ARGS)


def _fire_value(text: str) -> Any:
    """A command-line value as fire (``python -m monai.bundle``) parses it."""
    try:
        from fire.parser import DefaultParseValue

        return DefaultParseValue(text)
    except ImportError:  # pragma: no cover - fire is how monai.bundle reads its command line
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def _is_flag(arg: str) -> bool:
    # fire's rule: starts with a hyphen and is not a negative number
    return arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg) is not None


def parse_bundle_argv(argv: Sequence[str]) -> tuple[str | None, dict[str, tuple[str, Any]]] | None:
    """Split a ``python -m monai.bundle <command> ...`` command line (without the program name) the way fire does.

    Returns:
        ``(command, {name: (token, value)})`` with fire-parsed values (``token`` is the text as given, for messages),
        or None when ``argv`` is not a ``run``/``run_workflow`` command.
    """
    args = list(argv)
    if "--" in args:  # fire: the arguments after the last isolated "--" are fire's own flags
        args = args[: len(args) - 1 - args[::-1].index("--")]
    if not args or args[0] not in RUN_COMMANDS:
        return None
    command, rest = args[0], args[1:]
    order, _ = _own_args()
    kwargs: dict[str, tuple[str, Any]] = {}
    positional: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not _is_flag(arg):
            positional.append(arg)
            i += 1
            continue
        stripped = arg.lstrip("-")
        if "=" in stripped:
            key, text = stripped.split("=", 1)
            key, token = key.replace("-", "_"), arg
        elif i + 1 == len(rest) or _is_flag(rest[i + 1]):  # a bare flag: True, or False for --noNAME
            key, text, token = stripped.replace("-", "_"), "True", arg
            if key not in order and key.startswith("no"):
                key, text = key[2:], "False"
        else:
            key, text, token = stripped.replace("-", "_"), rest[i + 1], f"{arg} {rest[i + 1]}"
            i += 1
        kwargs[key] = (token, _fire_value(text))
        i += 1
    free = [n for n in order if n not in kwargs]
    for name, text in zip(free, positional):
        kwargs[name] = (text, _fire_value(text))
    return command, kwargs


def _config_files(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if not Path(text).is_file() and "," in text:
            return [t.strip() for t in text.split(",") if t.strip()]
        return [text]
    return [os.fspath(v) for v in value]


def _load(files: Sequence[str]) -> dict:
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files(list(files))


def known_ids(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every id of a config: top-level ids and ``#``-paths into dicts and lists, mapped to their values."""
    out: dict[str, Any] = {}
    items: Iterable = config.items() if isinstance(config, Mapping) else enumerate(config)
    for k, v in items:
        key = f"{prefix}{k}"
        out[key] = v
        if isinstance(v, (Mapping, list)):
            out.update(known_ids(v, f"{key}#"))
    return out


def _is_expression(value: Any) -> bool:
    return isinstance(value, str) and value[:1] in ("$", "@", "%")


def _path_option(key: str, default: Any) -> bool:
    name = key.rsplit("#", 1)[-1]
    if default is None or isinstance(default, (bool, int, float, Mapping, list)):
        return False
    return bool(_PATH_NAME.search(name)) or (isinstance(default, str) and not _is_expression(default)
                                             and bool(_FILE_LIKE.search(default)))


def _type_problem(key: str, default: Any, value: Any) -> str | None:
    """Why ``value`` cannot be the option ``key`` whose config value is ``default`` (None: it can)."""
    if value is None or default is None or _is_expression(value):
        return None
    if isinstance(default, bool):
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return None
        hint = " (fire passes `true`/`false` on as strings, which are always true: write True or False)" \
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off") else ""
        return f"expected a bool (True or False){hint}"
    if isinstance(default, int) and not isinstance(default, bool):
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "expected a number"
    if _path_option(key, default):
        return None if isinstance(value, (str, os.PathLike)) else "expected a path (a string)"
    return None


def _describe(value: Any) -> str:
    return f"the {type(value).__name__} {value!r}"


def check_overrides(config_files: Sequence[str], overrides: Mapping[str, Any],
                    tokens: Mapping[str, str] | None = None) -> None:
    """Check config overrides against the merged ``config_files``.

    Args:
        config_files: the config files, merged in order as ``monai.bundle`` does.
        overrides: ``{id: value}``, values as ``monai.bundle`` receives them.
        tokens: ``{id: text as given}`` for the messages (e.g. ``--max_epoch 1``).

    Raises:
        ConfigError: listing every unknown id (with the closest known ids) and every ill-typed value.
    """
    tokens = dict(tokens or {})
    ids = known_ids(_load(config_files))
    names = sorted(ids)
    problems = []
    for key, value in overrides.items():
        norm = str(key).replace("::", "#")
        given = tokens.get(key, f"--{key} {value}")
        if norm.startswith("_meta_"):
            continue
        if norm not in ids:
            close = difflib.get_close_matches(norm, names, n=5, cutoff=0.6)
            hint = f"closest known keys: {', '.join(close)}" if close else \
                f"no close match; top-level keys: {', '.join(k for k in names if '#' not in k)}"
            problems.append(f"unknown key `{norm}` (in `{given}`): no config defines it; {hint}")
            continue
        why = _type_problem(norm, ids[norm], value)
        if why:
            problems.append(f"`{norm}` (in `{given}`): {why} like the config's default {ids[norm]!r}, "
                            f"got {_describe(value)}")
    if problems:
        files = ", ".join(os.path.basename(os.fspath(f)) for f in config_files)
        raise ConfigError(f"bad command-line override(s) for [{files}]:\n  - " + "\n  - ".join(problems)
                          + "\n(A new key can be added with an extra config file in --config_file.)")


def _is_bundle_main(prog: str) -> bool:
    return Path(prog).parts[-3:] == ("monai", "bundle", "__main__.py")


def check_cli_overrides(argv: Sequence[str] | None = None) -> None:
    """Check the ``--key value`` overrides of this ``python -m monai.bundle run`` process (see the module doc).

    Args:
        argv: a full command line (``[program, "run", "--config_file", ...]``) to check instead of ``sys.argv``;
            a bad override then raises :class:`ConfigError`. With ``sys.argv`` of a ``monai.bundle`` process the
            error is printed without a traceback and the process exits with status 2; in any other process
            (tests, Python callers of ``monai.bundle.run``) nothing is checked.

    Raises:
        ConfigError: for an unknown or ill-typed override (``argv`` given).
    """
    from_cli = argv is None
    argv = list(sys.argv if argv is None else argv)
    if from_cli and not (argv and _is_bundle_main(argv[0])):
        return
    if from_cli:
        install_error_hook()
    parsed = parse_bundle_argv(argv[1:])
    if parsed is None:
        return
    command, kwargs = parsed
    _, own = _own_args()
    settings: dict[str, Any] = {}
    tokens: dict[str, str] = {}
    args_file = kwargs.get("args_file", (None, None))[1]
    if args_file:
        from monai.bundle import ConfigParser

        content = ConfigParser.load_config_file(os.fspath(args_file))
        for k, v in dict(content).items():
            settings[k] = v
            tokens[k] = f"{k}: {v!r} in args_file {os.fspath(args_file)}"
    for k, (token, v) in kwargs.items():
        settings[k] = v
        tokens[k] = token
    workflow = settings.get("workflow_name")
    if command == "run_workflow" and workflow not in (None, "ConfigWorkflow"):
        return
    files = _config_files(settings.get("config_file"))
    if not files:
        return
    overrides = {k: v for k, v in settings.items() if k not in own}
    try:
        check_overrides(files, overrides, tokens)
    except ConfigError as e:
        if not from_cli:
            raise
        print(f"ConfigError: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def package_error(exc: BaseException | None) -> BaseException | None:
    """The first of this package's errors (:class:`~monai_wsi_ext.errors.MonaiWsiExtError`) in ``exc``'s chain of
    causes and contexts (MONAI wraps an error raised in a config expression in a ``RuntimeError``), or None."""
    from monai_wsi_ext.errors import MonaiWsiExtError

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MonaiWsiExtError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_error_hook() -> None:
    """Make an uncaught package error end the process with its own message and status 1, without a traceback.

    Other exceptions (bugs) keep Python's traceback; so does everything when ``MONAI_WSI_EXT_TRACEBACK=1``.
    Installed once per process by :func:`check_cli_overrides` in a ``monai.bundle`` process.
    """
    previous = sys.excepthook
    if getattr(previous, "_monai_wsi_ext", False):
        return

    def hook(exc_type, exc, tb):
        error = package_error(exc)
        if error is None or os.environ.get("MONAI_WSI_EXT_TRACEBACK", "") not in ("", "0"):
            previous(exc_type, exc, tb)
            return
        print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        print("(the run stopped on this error; set MONAI_WSI_EXT_TRACEBACK=1 to see the traceback)", file=sys.stderr,
              flush=True)

    hook._monai_wsi_ext = True
    sys.excepthook = hook
