"""The command line's building blocks: a subcommand with its help and description, the
shared flags, and the bridge that turns a pydantic model's fields into flags.

Kept on argparse: typer or pydantic-settings' CLI would render help differently (rich
panels, other metavars and defaults), and every command's flags and help must stay as they
are; the bridge below is the one piece they would replace, and it is 40 lines.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel

from cogpipe.compat import HelpFormatter

DEBUG_HELP = "show tracebacks and Prefect's full console output"
CONFIG_HELP = "the pipeline config YAML (e.g. demo/demo.yaml, written by `cogpipe demo`)"


def command(sub, name: str, help: str, about: str, fn) -> argparse.ArgumentParser:
    """A subcommand: `help` is its line in `cogpipe --help`, `about` (what it reads and
    writes, an example) follows it in `cogpipe NAME --help`."""
    p = sub.add_parser(
        name,
        help=help,
        description=f"{help[0].upper()}{help[1:]}.\n\n{about.strip()}",
        formatter_class=HelpFormatter,
    )
    p.set_defaults(fn=fn)
    return p


def debug_flag(p: argparse.ArgumentParser) -> None:
    """--debug on a command, as on `cogpipe` itself (either place turns it on)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def set_flag(p: argparse.ArgumentParser) -> None:
    """--set FIELD=VALUE (repeatable): the config changed for this command only."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        dest="sets",
        help="override one dotted config field, e.g. train.max_steps=500 (repeatable); the"
        " value is read as YAML",
    )


def flag_help(field, config_field: str | None) -> str:
    """A field's description as flag help: 'sampler steps; default: 50 (--config: evaluate.steps)'."""
    text = (field.description or "").rstrip(".").replace("%", "%%")
    first = text.split(" ", 1)[0]
    if len(first) == 1 or first[1:].islower():  # "Sampler", "A" lower case; "CPU", "LoRA" stay
        text = text[:1].lower() + text[1:]
    if field.annotation is bool:
        text += f"; default: {'on' if field.default else 'off'}"
    elif field.default is not None:
        text += f"; default: {field.default}"
    return text + (f" (--config: its {config_field})" if config_field else "")


def flag_metavar(annotation) -> str | None:
    """PATH, N or X for a path, integer or number flag (choices show themselves)."""
    if Path in (annotation, *get_args(annotation)):
        return "PATH"
    given = [a for a in get_args(annotation) if a is not type(None)]  # int | None: the model's
    return {int: "N", float: "X"}.get(given[0] if len(given) == 1 else annotation)


def add_model_options(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    from_config: dict[str, str] | None = None,
) -> None:
    """One flag per field of a pydantic model (`lora_scale` -> `--lora-scale`).

    Help and choices come from the field (and `from_config`: field -> where `--config` holds
    it); defaults stay in the model (an option not given is not passed), and pydantic
    converts and validates the strings.
    """
    for name, field in model.model_fields.items():
        kwargs = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": flag_help(field, (from_config or {}).get(name)),
        }
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(field.annotation) is Literal:
            kwargs["choices"] = get_args(field.annotation)
        else:
            kwargs["metavar"] = flag_metavar(field.annotation)
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    """--prompt, --prompt-file or --prompts-dir: exactly one."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", metavar="TEXT", help="a prompt as text")
    group.add_argument(
        "--prompt-file", metavar="NAME", help="prompts/NAME.txt (from the current folder) or a path"
    )
    group.add_argument(
        "--prompts-dir", metavar="DIR", help="every .txt in DIR: one prompt each, named by its stem"
    )


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--config and --latest: generate as a config's evaluation samples."""
    parser.add_argument(
        "--config",
        metavar="CONFIG",
        help="a pipeline config YAML: its model and evaluate settings (frames, size, steps, "
        "guidance, fps, first seed, device) are the defaults; flags given win",
    )
    parser.add_argument(
        "--latest",
        action="store_true",
        help="with --config: the newest checkpoint of the config's training run "
        "(train/<run>/checkpoint-NNNNNN) as --lora, or as --transformer for a full fine-tune",
    )
