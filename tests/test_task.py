"""Task: validation when built, rendering for masked and causal LMs, serialisation."""

from __future__ import annotations

import pytest

from dect_maas import ConfigError, Task, TaskError

SST2 = "{text} In summary, it was {mask}"


def test_a_valid_task():
    t = Task(SST2, {"negative": "bad", "positive": ["great", "good"]}, name="sst2")
    assert t.classes == ("negative", "positive")
    assert t.n_classes == 2
    assert t.words("positive") == ("great", "good")
    assert t.label_strings() == ((" bad",), (" great", " good"))
    assert t.has_mask
    assert not t.is_pair
    with pytest.raises(KeyError):
        t.words("neutral")
    assert list(t) == [("negative", ("bad",)), ("positive", ("great", "good"))]


def test_label_words_as_pairs_keep_order():
    t = Task(SST2, [("z", "no"), ("a", ["yes"])])
    assert t.classes == ("z", "a")


def test_render_masked_and_causal():
    t = Task(SST2, {"n": "bad", "p": "great"})
    assert t.render("Fine.", mask_token="<mask>") == "Fine. In summary, it was <mask>"
    assert t.render("Fine.") == "Fine. In summary, it was"  # causal: the prompt ends at {mask}
    assert t.content_free(mask_token="[MASK]") == " In summary, it was [MASK]"
    no_mask = Task("Review: {text}\nSentiment:", {"n": "bad", "p": "good"})
    assert no_mask.render("ok") == "Review: ok\nSentiment:"
    with pytest.raises(TaskError, match="has no \\{mask\\}"):
        no_mask.render("ok", mask_token="<mask>")


def test_pairs():
    t = Task("{text} ? {mask}, {text_b}", {"no": "No", "yes": "Yes"})
    assert t.is_pair
    assert t.render("A", "B", mask_token="<m>") == "A ? <m>, B"
    assert t.content_free(mask_token="<m>") == " ? <m>, "
    with pytest.raises(TaskError, match="give text_b"):
        t.render("A", mask_token="<m>")
    with pytest.raises(TaskError, match="must end the template"):
        t.render("A", "B")  # causal LM: text after the scoring position
    single = Task(SST2, {"n": "bad", "p": "great"})
    with pytest.raises(TaskError, match="no \\{text_b\\} slot"):
        single.render("A", "B", mask_token="<m>")
    with pytest.raises(TaskError, match="text must be a string"):
        single.render(3, mask_token="<m>")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("template", "words", "message"),
    [
        ("It was {mask}", {"n": "bad", "p": "good"}, "no text slot"),
        ("{text} {mask} and {mask}", {"n": "bad", "p": "good"}, "two scoring positions"),
        ("{text} {text} {mask}", {"n": "bad", "p": "good"}, "two \\{text\\} slots"),
        (
            "{text} {label} {mask}",
            {"n": "bad", "p": "good"},
            "unknown placeholder\\(s\\) \\{label\\}",
        ),
        ("", {"n": "bad", "p": "good"}, "non-empty string"),
        (SST2, [("n", "bad"), ("n", "good")], "duplicate class 'n'"),
        (SST2, {"n": [], "p": "good"}, "class 'n' has no label words"),
        (SST2, {"n": "bad", "p": ""}, "class 'p' has an empty label word"),
        (SST2, {"n": "bad", "p": ["good", "  "]}, "empty label word"),
        (SST2, {"n": "bad"}, "at least two classes"),
        (SST2, {"": "bad", "p": "good"}, "class names must be non-empty"),
        (SST2, "bad,good", "must map each class"),
        (SST2, [("n", "bad", "x"), ("p", "good")], "must map each class"),
        (SST2, {"n": 3, "p": "good"}, "string or a list of strings"),
    ],
)
def test_invalid_tasks_fail_when_built_with_a_message_naming_the_problem(template, words, message):
    with pytest.raises(TaskError, match=message):
        Task(template, words)


def test_task_error_is_a_config_error_and_value_error():
    with pytest.raises(ConfigError):
        Task("no slot", {"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="no text slot"):
        Task("no slot", {"a": "x", "b": "y"})


def test_dict_round_trip_and_unknown_fields():
    t = Task(SST2, {"n": ["bad"], "p": ["great"]}, name="s", label_word_prefix="")
    assert Task.from_dict(t.to_dict()) == t
    with pytest.raises(TaskError, match="unknown task field\\(s\\): verbalizer"):
        Task.from_dict({**t.to_dict(), "verbalizer": "x"})
    with pytest.raises(TaskError, match="name must be"):
        Task(SST2, {"n": "bad", "p": "great"}, name="")
