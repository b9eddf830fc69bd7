"""The "did you mean" wording shared by every error that names a misspelt choice."""

from archc.common.suggest import close_matches, did_you_mean, did_you_mean_any


def test_one_suggestion_is_quoted_in_parentheses():
    assert did_you_mean("widht", ["width", "depth"]) == " (did you mean 'width'?)"


def test_no_close_choice_gives_no_hint():
    assert did_you_mean("zzz", ["width", "depth"]) == ""
    assert did_you_mean_any("zzz", ["width", "depth"]) == ""


def test_up_to_three_suggestions_closest_first():
    names = ["regnetx_200mf", "regnetx_400mf", "regnetx_600mf", "regnetx_800mf", "resnet50"]
    hint = did_you_mean_any("regnetx_400m", names)
    assert hint.startswith("; did you mean regnetx_400mf, ") and hint.endswith("?")
    assert hint.count(",") == 2


def test_closeness_is_difflibs_ratio_at_least_0_6():
    # "ab" vs "ax": 2*1/4 = 0.5 (too far); "abc" vs "abx": 2*2/6 = 0.67 (close)
    assert close_matches("ab", ["ax"]) == []
    assert close_matches("abc", ["abx"]) == ["abx"]
    assert close_matches(7, ["7"]) == ["7"]  # non-string words are compared as text
