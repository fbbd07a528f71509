"""Prompt templates: the shipped file loads and every template renders within the model's
text limit; unknown templates, missing or unknown slots and bad files fail naming the fault."""

from __future__ import annotations

import json
import math
import re

import pytest

from cogpipe.templates import (
    MAX_SLOT_CHARS,
    SHIPPED,
    Template,
    TemplateError,
    load_templates,
    render,
    slot_names,
)

T5_LIMIT = 226  # CogVideoX's max_text_seq_length: tokens past it are dropped
# A realistic long slot value (12 words): what a person types for a competitor.
LONG_VALUE = "a tall bald fighter in black shorts with a thick dark beard and tattoos"


def t5_tokens_upper(text: str) -> int:
    """A conservative estimate of T5 (sentencepiece, 32k vocabulary) tokens: no tokenizer is
    available offline. Every punctuation mark is a token; every word counts as the larger of
    1.4 tokens (English prose averages ~1.3 T5 tokens per word) and one per 6 characters
    (rare words split into pieces); plus the end-of-sequence token."""
    pieces = re.findall(r"\w+|[^\w\s]", text)
    words = [p for p in pieces if p[0].isalnum() or p[0] == "_"]
    tenths = sum(max(14, 10 * math.ceil(len(w) / 6)) for w in words)  # integers: no float drift
    return -(-tenths // 10) + (len(pieces) - len(words)) + 1


def fill(template: Template) -> dict[str, str]:
    """A long value for each of the template's required slots."""
    return {slot: LONG_VALUE for slot in template.required}


def test_shipped_templates_cover_the_plans_scenarios():
    templates = load_templates()
    assert load_templates(SHIPPED) == templates
    # The user's plan names these; its motion vocabulary needs strike, absorb, referee, KO.
    assert {"strike", "defensive_absorb", "referee_stop", "knockout"} <= set(templates)
    for name, t in templates.items():
        assert t.name == name and t.description and len(t.text.split()) >= 50, name
        assert t.slots == slot_names(t.text)
        assert set(t.defaults) <= set(t.slots) and {"striker", "receiver"} <= set(t.required)
        json.dumps(t.as_dict())  # what the service lists


def test_every_template_renders_with_defaults_within_the_t5_limit():
    templates = load_templates()
    for name, t in templates.items():
        prompt = render(templates, name, fill(t))
        assert "{" not in prompt and "}" not in prompt, name
        assert prompt.count(LONG_VALUE) == t.text.count("{striker}") + t.text.count("{receiver}")
        for default in t.defaults.values():
            assert " ".join(default.split()) in prompt, (name, default)
        assert t5_tokens_upper(prompt) <= T5_LIMIT, (name, t5_tokens_upper(prompt))


def test_given_slots_override_defaults_and_are_inserted_verbatim():
    templates = load_templates()
    slots = fill(templates["strike"]) | {"hand": "left", "angle": "The camera shows {x}  here."}
    prompt = render(templates, "strike", slots)
    assert "left arm" in prompt and "right arm" not in prompt
    assert prompt.endswith("The camera shows {x} here. " + templates["strike"].defaults["lighting"])


def test_the_token_estimate_is_not_below_a_word_count():
    text = "A fighter slaps his opponent, hard."
    assert t5_tokens_upper(text) >= len(text.split()) + 2  # 2 punctuation marks
    assert t5_tokens_upper("x " * 100) == 141


@pytest.mark.parametrize(
    ("name", "slots", "message"),
    [
        ("uppercut", {}, "unknown template 'uppercut'; known: defensive_absorb, "),
        ("strike", {"striker": "a bald man"}, "template 'strike': missing slot(s) receiver"),
        (
            "strike",
            {"striker": "a", "receiver": "b", "crowd": "c", "angel": "d"},
            "template 'strike': unknown slot(s) angel, crowd; its slots: striker, receiver, hand",
        ),
        ("strike", {"striker": 3, "receiver": "b"}, "slot 'striker': expected a string, got int"),
        ("strike", {"striker": " \n", "receiver": "b"}, "slot 'striker': empty value"),
        (
            "strike",
            {"striker": "x" * (MAX_SLOT_CHARS + 1), "receiver": "b"},
            f"slot 'striker': {MAX_SLOT_CHARS + 1} characters, at most {MAX_SLOT_CHARS}",
        ),
    ],
)
def test_render_errors_name_what_is_wrong(name, slots, message):
    with pytest.raises(TemplateError) as err:
        render(load_templates(), name, slots)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a: [1, 2\nb: 3\n", "not valid YAML at line "),
        ("- a\n- b\n", "expected a mapping of template names to templates"),
        ("", "expected a mapping of template names to templates"),
        ("a: just text\n", "template 'a': expected a mapping with 'text'"),
        ("a: {description: d}\n", "template 'a': 'text' must be a non-empty string"),
        ("a: {text: 'hi {who}', colour: red}\n", "template 'a': unknown field(s) colour"),
        ("a: {text: 'hi {0}'}\n", "template 'a': slot {0} is not a plain {name} field"),
        ("a: {text: 'hi {who.name}'}\n", "slot {who.name} is not a plain {name} field"),
        ("a: {text: 'hi {who'}\n", "template 'a': unbalanced braces (expected '}' before end"),
        (
            "a: {text: 'hi {who}', defaults: {whom: x}}\n",
            "template 'a': defaults for slot(s) not in its text: whom",
        ),
        (
            "a: {text: 'hi {who}', defaults: {who: [x]}}\n",
            "template 'a': 'defaults' must map slots to strings",
        ),
    ],
)
def test_bad_files_fail_naming_the_file_and_reason(tmp_path, content, message):
    path = tmp_path / "mine.yaml"
    path.write_text(content)
    with pytest.raises(TemplateError) as err:
        load_templates(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(TemplateError, match=r"nothere\.yaml: cannot read: "):
        load_templates(tmp_path / "nothere.yaml")


def test_a_users_file_loads_and_renders(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "ko:\n  description: A knockout.\n  text: >-\n    {who} falls\n    {how}.\n"
        "  defaults:\n    how: slowly\n"
    )
    templates = load_templates(path)
    assert templates["ko"].slots == ("who", "how") and templates["ko"].required == ("who",)
    assert render(templates, "ko", {"who": "The receiver"}) == "The receiver falls slowly."
