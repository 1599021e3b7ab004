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


def test_eval_is_a_table_in_toml_and_a_flag_prefix(tmp_path):
    from hhh.config import DetoxConfig, to_toml_dict

    f = tmp_path / "c.toml"
    f.write_text('steps = 3\n[eval]\nprompts = ["benign:eval"]\nsamples = 2\n')
    config = load_config(DetoxConfig, f, {"eval": {"max_prompts": 5}})  # a flag keeps the file's other [eval] keys
    assert (config.steps, config.eval.prompts, config.eval.samples, config.eval.max_prompts) == \
        (3, ["benign:eval"], 2, 5)
    assert to_toml_dict(config)["eval"] == {"prompts": ["benign:eval"], "samples": 2, "max_prompts": 5,
                                            "batch_size": 64}
    # run folders written before [eval] was a table still load (--resume)
    old = tmp_path / "old.toml"
    old.write_text('eval_prompts = ["redteam:eval"]\neval_max_prompts = 4\nsteps = 2\n')
    assert load_config(DetoxConfig, old).eval.max_prompts == 4
    with pytest.raises(ConfigError, match=r"flag --eval-max-prompts: key 'eval.max_prompts'"):
        load_config(DetoxConfig, None, {"eval": {"max_prompts": "0"}})
    with pytest.raises(ConfigError, match=r"unknown key 'eval.sample'"):
        load_config(DetoxConfig, None, {"eval": {"sample": 2}})


def test_one_default_per_setting():
    """A setting shared by several commands has its default in one class (the KL budget once lived in two places)."""
    from hhh.config import DetoxConfig, GRPOConfig, OnlineSettings, RLOOConfig
    from hhh.train.guards import Guards

    for cls in (DetoxConfig, GRPOConfig, RLOOConfig):
        assert cls().kl_budget == OnlineSettings().kl_budget == Guards.from_settings(cls()).kl_budget
        assert cls().eval == DetoxConfig().eval
