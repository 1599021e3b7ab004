"""Constitutional AI: the constitution, prompts, filters, labels, and both stages on a tiny model."""

import pytest

from hhh.cai.constitution import load_constitution
from hhh.config import ConfigError

GOOD = '''
[[principle]]
name = "harm"
critique = "What is harmful?"
revision = "Rewrite it harmlessly."

[[principle]]
name = "honesty"
critique = "What is false?"
revision = "Rewrite it truthfully."

[[comparison]]
name = "better"
question = "Which is better?"
'''


def test_default_constitution_covers_harm_honesty_helpfulness_and_evasion():
    c = load_constitution()
    names = {p.name for p in c.principle}
    assert len(c.principle) >= 16 and len(c.comparison) >= 4 and len(c.example) >= 2
    assert {"harm", "honesty", "helpfulness", "no-evasion"} <= names
    assert all(p.critique and p.revision for p in c.principle)


def test_principle_is_drawn_per_prompt_from_the_seed():
    c = load_constitution()
    first = [c.principle_for(0, i).name for i in range(40)]
    assert first == [c.principle_for(0, i).name for i in range(40)]  # same seed, same draw, in any order
    assert first != [c.principle_for(1, i).name for i in range(40)]
    assert len(set(first)) > 8  # spread over the principles


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace('revision = "Rewrite it truthfully."\n', ""),
     "principle 2 ('honesty'): field 'revision' is missing"),
    (lambda s: s.replace('critique = "What is false?"', 'critique = "  "'),
     "principle 2 ('honesty'): field 'critique' String should have at least 1 character"),
    (lambda s: s.replace('critique = "What is false?"', 'critique = "What is false?"\ncritic = "x"'),
     "principle 2 ('honesty'): field 'critic' is not a known field"),
    (lambda s: s.replace('name = "honesty"', 'name = "harm"'), "principle 2 ('harm'): name repeats"),
    (lambda s: s.replace("[[comparison]]", "[[comparisons]]"), "unknown table 'comparisons'"),
    (lambda s: s.split("[[comparison]]")[0], "[[comparison]] needs at least one entry"),
    (lambda s: s.replace('critique = "What is harmful?"', "critique = 3"),
     "principle 1 ('harm'): field 'critique' Input should be a valid string (got 3)"),
    (lambda s: 'principle = "x"\n', "'principle' must be an array of tables"),
    (lambda s: s + "[[principle\n", "invalid TOML"),
])
def test_bad_constitution_is_one_line_naming_the_entry_and_field(tmp_path, edit, message):
    path = tmp_path / "c.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(ConfigError) as err:
        load_constitution(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"constitution {path}") and message in text, text


def test_missing_constitution_file(tmp_path):
    with pytest.raises(ConfigError, match=r"constitution .*nope.toml: not found"):
        load_constitution(tmp_path / "nope.toml")
    (tmp_path / "good.toml").write_text(GOOD)
    assert [p.name for p in load_constitution(tmp_path / "good.toml").principle] == ["harm", "honesty"]
