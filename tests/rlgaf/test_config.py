import pytest
import yaml

from rlgaf_fast.rlgaf import RLGAFConfig


def test_yaml_round_trip_top_level_and_trainer_section(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("mode: gumbel\ntau_start: 2.0\ntau_schedule: linear\nbatch_size: 4\n"
                    "minibatch_size: 2\n")
    config = RLGAFConfig.from_yaml(path)
    assert (config.mode, config.tau_start, config.tau_schedule) == ("gumbel", 2.0, "linear")
    path.write_text(yaml.safe_dump({"generator": {"x": 1}, "trainer": config.to_dict()}))
    assert RLGAFConfig.from_yaml(path) == config


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        RLGAFConfig.from_dict({"learning_rate": 1.0})


@pytest.mark.parametrize("field,value", [("mode", "dpo"), ("reward_type", "x"),
                                         ("batch_size", 0), ("kl_coef", -1.0), ("mle_coef", -0.5),
                                         ("adam_beta1", 1.0), ("adam_beta1", -0.1),
                                         ("minibatch_size", 3)])
def test_bad_values_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        RLGAFConfig(**{field: value})


def test_yaml_python_tags_do_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"mode: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(yaml.YAMLError):
        RLGAFConfig.from_yaml(path)
    assert not marker.exists()
