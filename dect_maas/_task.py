"""A classification task: a prompt template (slots, scoring position), classes and label words.

The template uses three placeholders and nothing else in braces:

- ``{text}`` (required) and ``{text_b}`` (sentence pairs) for the input;
- ``{mask}``, the scoring position. Masked LMs put their mask token there. Causal LMs score the next
  token after the prompt, so for them ``{mask}`` must end the template (or be left out: the end
  of the prompt is then the scoring position).

Label words are scored by their first token, written with ``label_word_prefix`` (a leading space by
default, as OpenPrompt's ManualVerbalizer does: `" great"` is what a model predicts after "it was").
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import TaskError

__all__ = ["Task"]

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_KNOWN = ("text", "text_b", "mask")


@dataclass(frozen=True)
class Task:
    """An immutable, validated classification task.

    >>> task = Task("{text} In summary, it was {mask}", {"negative": "bad", "positive": "great"})
    >>> task.classes
    ('negative', 'positive')
    >>> task.render("A fine film.", mask_token="<mask>")
    'A fine film. In summary, it was <mask>'
    """

    template: str
    label_words: Any  # normalised to tuple[tuple[str, tuple[str, ...]], ...] in __post_init__
    name: str = "task"
    label_word_prefix: str = " "
    _pieces: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or not self.template.strip():
            raise TaskError("template must be a non-empty string containing the slot {text}")
        names = _PLACEHOLDER.findall(self.template)
        unknown = sorted({n for n in names if n not in _KNOWN})
        if unknown:
            raise TaskError(
                f"template has unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
                "use {text}, {text_b} and {mask} only"
            )
        if "text" not in names:
            raise TaskError(
                f"template {self.template!r} has no text slot: put {{text}} where the input goes"
            )
        for slot in _KNOWN:
            if names.count(slot) > 1:
                what = "two scoring positions" if slot == "mask" else f"two {{{slot}}} slots"
                raise TaskError(
                    f"template {self.template!r} has {what}; {{{slot}}} may appear once only"
                )
        object.__setattr__(self, "label_words", _normalise_label_words(self.label_words))
        object.__setattr__(self, "_pieces", tuple(_PLACEHOLDER.split(self.template)))
        if not isinstance(self.name, str) or not self.name:
            raise TaskError("name must be a non-empty string")

    # -- what the task is -------------------------------------------------------------------------

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(str(c) for c, _ in self.label_words)

    @property
    def n_classes(self) -> int:
        return len(self.label_words)

    @property
    def has_mask(self) -> bool:
        return "mask" in self._pieces[1::2]

    @property
    def is_pair(self) -> bool:
        return "text_b" in self._pieces[1::2]

    def words(self, cls: str) -> tuple[str, ...]:
        for c, ws in self.label_words:
            if c == cls:
                return tuple(ws)
        raise KeyError(cls)

    def label_strings(self) -> tuple[tuple[str, ...], ...]:
        """Per class, the strings to tokenize for its label words (prefix applied)."""
        return tuple(tuple(self.label_word_prefix + w for w in ws) for _, ws in self.label_words)

    def __iter__(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        return iter(self.label_words)

    # -- rendering --------------------------------------------------------------------------------

    def render(self, text: str, text_b: str | None = None, *, mask_token: str | None = None) -> str:
        """The prompt for one input.

        With ``mask_token`` (masked LMs) the scoring position holds that token. Without it (causal
        LMs) the prompt ends where scoring happens, so ``{mask}`` must close the template.
        """
        if not isinstance(text, str):
            raise TaskError(f"text must be a string, got {type(text).__name__}")
        if text_b is not None and not self.is_pair:
            raise TaskError("text_b given but the template has no {text_b} slot")
        if text_b is None and self.is_pair:
            raise TaskError("the template has a {text_b} slot: give text_b for every input")
        if mask_token is None:
            self.check_causal()
        elif not self.has_mask:
            raise TaskError(
                f"template {self.template!r} has no {{mask}}: "
                "a masked LM needs the scoring position"
            )
        values = {"text": text, "text_b": text_b or "", "mask": mask_token or ""}
        out = []
        for i, piece in enumerate(self._pieces):
            out.append(values[piece] if i % 2 else piece)
        rendered = "".join(out)
        return rendered if mask_token is not None else rendered.rstrip(" ")

    def content_free(self, *, mask_token: str | None = None) -> str:
        """The content-free prompt used for calibration (empty text, DecT §2.2)."""
        return self.render("", "" if self.is_pair else None, mask_token=mask_token)

    def check_causal(self) -> None:
        """Raise unless a causal LM can score this template (nothing after ``{mask}``)."""
        if self.has_mask:
            after = self._pieces[-1] if self._pieces[-2] == "mask" else None
            if after is None or after.strip():
                raise TaskError(
                    f"template {self.template!r}: a causal LM scores the next token after the "
                    "prompt, so {mask} must end the template; move the text after it before it"
                )

    # -- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "template": self.template,
            "label_words": {c: list(ws) for c, ws in self.label_words},
            "label_word_prefix": self.label_word_prefix,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        known = {"name", "template", "label_words", "label_word_prefix"}
        extra = sorted(set(data) - known)
        if extra:
            raise TaskError(f"unknown task field(s): {', '.join(extra)}")
        return cls(**dict(data))


def _normalise_label_words(raw: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
        items = []
        for item in raw:
            if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2):
                raise TaskError(
                    "label_words must map each class to its words, e.g. "
                    '{"negative": ["bad"], "positive": ["great"]}'
                )
            items.append((item[0], item[1]))
    else:
        raise TaskError(
            "label_words must map each class to its words, "
            'e.g. {"negative": "bad", "positive": "great"}'
        )
    if len(items) < 2:
        raise TaskError(f"a task needs at least two classes, got {len(items)}")
    seen: set[str] = set()
    owner: dict[str, str] = {}  # label word -> its class
    out = []
    for cls, words in items:
        if not isinstance(cls, str) or not cls.strip():
            raise TaskError(f"class names must be non-empty strings, got {cls!r}")
        if cls in seen:
            raise TaskError(f"duplicate class {cls!r}: each class may appear once")
        seen.add(cls)
        ws: tuple[str, ...]
        if isinstance(words, str):
            ws = (words,)
        elif isinstance(words, Sequence):
            ws = tuple(words)
        else:
            raise TaskError(f"class {cls!r}: label words must be a string or a list of strings")
        if not ws:
            raise TaskError(f"class {cls!r} has no label words; give at least one")
        for w in ws:
            if not isinstance(w, str) or not w.strip():
                raise TaskError(f"class {cls!r} has an empty label word {w!r}")
            # A word scored for two classes would give both the same evidence: the decoder could
            # not tell them apart by it, and which class "owns" the score would be arbitrary.
            if w in owner:
                where = (
                    f"twice for {cls!r}"
                    if owner[w] == cls
                    else f"for both {owner[w]!r} and {cls!r}"
                )
                raise TaskError(
                    f"label word {w!r} is given {where}; each word may name one class once"
                )
            owner[w] = cls
        out.append((cls, ws))
    return tuple(out)
