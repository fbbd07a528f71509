"""Prompt templates: the domain's common scenarios as long CogVideoX-style prompts with
named slots, filled per request by the inference service (or any script).

    templates = load_templates()  # the shipped cogpipe/prompts/templates.yaml
    prompt = render(templates, "strike", {"striker": "a bald fighter in black shorts",
                                          "receiver": "a bearded man in red shorts"})

The YAML file maps a template name to its `text` (slots written `{name}`), an optional
`description`, and optional `defaults` for slots:

    strike:
      description: The striker winds up and lands a slap; the receiver's head snaps.
      text: >-
        {striker} winds up ... {angle}.
      defaults:
        angle: The camera holds a steady medium shot from the side.

What is notable:
- a slot without a default is required; a value for a slot the text does not have is an
  error too (a misspelt slot name would otherwise be dropped silently);
- slot values are inserted as plain text, never formatted, so a value holding `{x}` stays
  as written; runs of whitespace in the result collapse to one space;
- the model reads at most 226 T5 tokens and drops the rest, so each slot value is capped
  (`MAX_SLOT_CHARS`) and shipped texts are written well under the limit.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import yaml

from cogpipe.errors import UserError

SHIPPED = Path(__file__).parent / "prompts" / "templates.yaml"
MAX_SLOT_CHARS = 200  # ~40 words: one slot cannot push a prompt past the 226-token limit
_FIELDS = {"text", "description", "defaults"}


class TemplateError(UserError, ValueError):
    """An unknown template, a missing or unknown slot, or a bad templates file."""


@dataclass(frozen=True)
class Template:
    """One scenario: its prompt text, the slots in it (in order) and their defaults."""

    name: str
    text: str
    slots: tuple[str, ...]
    description: str = ""
    defaults: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def required(self) -> tuple[str, ...]:
        """The slots a request must fill: those without a default."""
        return tuple(s for s in self.slots if s not in self.defaults)

    def as_dict(self) -> dict:
        """A JSON-ready description (what `GET /v1/templates` lists)."""
        return {
            "name": self.name,
            "description": self.description,
            "text": self.text,
            "slots": list(self.slots),
            "required": list(self.required),
            "defaults": dict(self.defaults),
        }


def slot_names(text: str) -> tuple[str, ...]:
    """The `{name}` fields of `text`, in first-seen order.

    Raises:
        ValueError: a field that is not a plain name (`{}`, `{0}`, `{a.b}`, `{a:>5}`) or
            an unbalanced brace.
    """
    names: list[str] = []
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as e:  # "Single '}' encountered", "expected '}' before end of string"
        raise ValueError(
            f"unbalanced braces ({e}); write a literal brace as {{{{ or }}}}"
        ) from None
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"slot {{{name}}} is not a plain {{name}} field")
        if name not in names:
            names.append(name)
    return tuple(names)


def _template(name: str, entry, where: str) -> Template:
    """One YAML entry as a Template; `where` names the file in errors."""
    if not isinstance(entry, dict):
        raise TemplateError(f"{where}: template {name!r}: expected a mapping with 'text'")
    if extra := sorted(set(entry) - _FIELDS):
        raise TemplateError(f"{where}: template {name!r}: unknown field(s) {', '.join(extra)}")
    text, description = entry.get("text"), entry.get("description", "")
    if not isinstance(text, str) or not text.strip():
        raise TemplateError(f"{where}: template {name!r}: 'text' must be a non-empty string")
    if not isinstance(description, str):
        raise TemplateError(f"{where}: template {name!r}: 'description' must be a string")
    try:
        slots = slot_names(text)
    except ValueError as e:
        raise TemplateError(f"{where}: template {name!r}: {e}") from None
    defaults = entry.get("defaults") or {}
    if not isinstance(defaults, dict) or not all(isinstance(v, str) for v in defaults.values()):
        raise TemplateError(f"{where}: template {name!r}: 'defaults' must map slots to strings")
    if unknown := sorted(set(defaults) - set(slots)):
        raise TemplateError(
            f"{where}: template {name!r}: defaults for slot(s) not in its text: "
            f"{', '.join(map(str, unknown))}"
        )
    return Template(
        name, " ".join(text.split()), slots, description.strip(), MappingProxyType(dict(defaults))
    )


def load_templates(path: Path | None = None) -> dict[str, Template]:
    """The templates of a YAML file, by name (None: the shipped templates).

    Raises:
        TemplateError: the file is missing, not YAML, not a mapping of templates, or a
            template is malformed; the message names the file and the reason.
    """
    path = Path(path) if path is not None else SHIPPED
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TemplateError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TemplateError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        reason = getattr(e, "problem", None) or type(e).__name__
        raise TemplateError(f"{path}: not valid YAML{at}: {reason}") from None
    if not isinstance(raw, dict) or not raw:
        raise TemplateError(f"{path}: expected a mapping of template names to templates")
    return {str(name): _template(str(name), entry, str(path)) for name, entry in raw.items()}


def _value(name: str, value) -> str:
    """A slot value as one line of text.

    Raises:
        TemplateError: not a string, empty, or longer than MAX_SLOT_CHARS.
    """
    if not isinstance(value, str):
        raise TemplateError(f"slot {name!r}: expected a string, got {type(value).__name__}")
    value = " ".join(value.split())
    if not value:
        raise TemplateError(f"slot {name!r}: empty value")
    if len(value) > MAX_SLOT_CHARS:
        raise TemplateError(
            f"slot {name!r}: {len(value)} characters, at most {MAX_SLOT_CHARS} (the model reads "
            f"226 tokens of the whole prompt)"
        )
    return value


def render(templates: Mapping[str, Template], name: str, slots: Mapping[str, object]) -> str:
    """The prompt of template `name` with `slots` filled in (defaults for those not given).

    Raises:
        TemplateError: an unknown template (the known ones listed), missing or unknown
            slots (named), or a bad slot value.
    """
    if name not in templates:
        known = ", ".join(sorted(templates)) or "none"
        raise TemplateError(f"unknown template {name!r}; known: {known}")
    template = templates[name]
    if unknown := sorted(set(slots) - set(template.slots)):
        raise TemplateError(
            f"template {name!r}: unknown slot(s) {', '.join(map(str, unknown))}; "
            f"its slots: {', '.join(template.slots) or 'none'}"
        )
    if missing := [s for s in template.required if s not in slots]:
        raise TemplateError(f"template {name!r}: missing slot(s) {', '.join(missing)}")
    values = dict(template.defaults) | {k: _value(k, v) for k, v in slots.items()}
    # Formatter.vformat on the template's own text: values are inserted, never parsed.
    text = string.Formatter().vformat(template.text, (), values)
    return " ".join(text.split())
