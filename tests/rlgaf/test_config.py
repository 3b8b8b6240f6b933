import pytest
import yaml

from rlgaf_fast.rlgaf import RLGAFConfig


def test_yaml_round_trip_top_level_and_trainer_section(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(
        "mode: gumbel\ntau_start: 2.0\ntau_schedule: linear\nbatch_size: 4\nminibatch_size: 2\n"
    )
    config = RLGAFConfig.from_yaml(path)
    assert (config.mode, config.tau_start, config.tau_schedule) == ("gumbel", 2.0, "linear")
    path.write_text(yaml.safe_dump({"generator": {"x": 1}, "trainer": config.to_dict()}))
    assert RLGAFConfig.from_yaml(path) == config


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        RLGAFConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="key 'kl_coeff'; did you mean 'kl_coef'"):
        RLGAFConfig.from_dict({"kl_coeff": 1.0})
    path = tmp_path / "cfg.yaml"
    path.write_text("trainer:\n  kl_coeff: 0.1\n")
    with pytest.raises(ValueError) as raised:
        RLGAFConfig.from_yaml(path)
    assert str(raised.value) == f"unknown trainer key 'kl_coeff' in {path}; did you mean 'kl_coef'?"


@pytest.mark.parametrize(
    "field,value",
    [
        ("mode", "dpo"),
        ("reward_type", "x"),
        ("batch_size", 0),
        ("kl_coef", -1.0),
        ("mle_coef", -0.5),
        ("adam_beta1", 1.0),
        ("adam_beta1", -0.1),
        ("minibatch_size", 3),
    ],
)
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


@pytest.mark.parametrize(
    "field,value",
    [
        ("generator_lr", -1.0),
        ("discriminator_lr", 0.0),
        ("clip_eps", -0.5),
        ("value_clip", 0.0),
        ("gamma", 3.0),
        ("lam", -1.0),
        ("vf_coef", -1.0),
        ("weight_decay", -1.0),
        ("baseline_decay", 1.0),
    ],
)
def test_out_of_range_values_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        RLGAFConfig(**{field: value})


@pytest.mark.parametrize(
    "field,value",
    [
        ("total_steps", "1e3"),
        ("batch_size", 2.5),
        ("batch_size", True),
        ("use_fused_kernels", "no"),
        ("kl_coef", None),
        ("extra", None),
        ("output_dir", 3),
    ],
)
def test_values_of_the_wrong_type_are_named(field, value):
    with pytest.raises(TypeError, match=f"{field} must be"):
        RLGAFConfig(**{field: value})


def test_yaml_numbers_load_as_their_types(tmp_path):
    # YAML 1.1 reads 1e3 as a string and 1.0e3 as a float: the first is refused by name.
    path = tmp_path / "a.yaml"
    path.write_text("total_steps: 1e3\n")
    with pytest.raises(TypeError, match="total_steps must be int, got '1e3'"):
        RLGAFConfig.from_yaml(path)
    path.write_text("kl_coef: 1\ngenerator_lr: 1.0e-3\n")  # an int is a fine float
    config = RLGAFConfig.from_yaml(path)
    assert (config.kl_coef, config.generator_lr) == (1, 1e-3)
    path.write_text("trainer:\n")
    with pytest.raises(TypeError, match="must be a mapping, got NoneType"):
        RLGAFConfig.from_yaml(path)
