import pytest
from pydantic import ValidationError

from hhh.config import ConfigError, EvalConfig, load_config


def test_defaults_file_and_flags_in_order(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('temperature = 0.9\nsamples_per_prompt = 2\nprompts = ["benign:eval"]\n')
    c = load_config(EvalConfig, f, {"samples_per_prompt": "3", "seed": None})
    assert c.temperature == 0.9 and c.samples_per_prompt == 3 and c.prompts == ["benign:eval"] and c.seed == 0


def test_lists_from_flags_are_comma_separated():
    assert load_config(EvalConfig, None, {"prompts": "redteam:eval, benign:eval"}).prompts == [
        "redteam:eval", "benign:eval"]


@pytest.mark.parametrize(
    "toml, message",
    [
        ("temperatur = 0.5", "config .*c.toml: unknown key 'temperatur'"),
        ('temperature = "hot"', "key 'temperature': Input should be a valid number"),
        ("temperature = -1", "key 'temperature': Input should be greater than 0"),
        ('dtype = "int8"', "key 'dtype'"),
        ("temperature = ", "invalid TOML"),
    ],
)
def test_file_errors_are_one_line_naming_the_key(tmp_path, toml, message):
    f = tmp_path / "c.toml"
    f.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=message) as e:
        load_config(EvalConfig, f)
    assert "\n" not in str(e.value)


def test_flag_errors_name_the_flag():
    with pytest.raises(ConfigError, match="flag --max-new-tokens: key 'max_new_tokens'"):
        load_config(EvalConfig, None, {"max_new_tokens": "many"})


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(EvalConfig, "/no/such.toml")


def test_configs_are_frozen():
    c = EvalConfig()
    with pytest.raises(ValidationError):
        c.seed = 3  # type: ignore[misc]


def test_shipped_example_config_is_valid():
    from pathlib import Path

    from hhh.config import DetoxConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "detox.toml"
    assert load_config(DetoxConfig, path).reward == "toxicity + 0.25*refusal"
