import pytest

from rlgaf_fast.rlgaf.config import MODES
from rlgaf_fast.rlgaf.modes import MODE_NAMES, MODE_TABLE, mode_spec


def test_the_config_accepts_exactly_the_tables_modes():
    assert (
        MODES
        == MODE_NAMES
        == (
            "sft",
            "ppo",
            "reinforce",
            "gumbel",
            "rlhf",
            "grpo",
            "rlhf-grpo",
        )
    )


@pytest.mark.parametrize("name", MODE_NAMES)
def test_each_mode_is_scored_by_at_most_one_judge(name):
    mode = mode_spec(name)
    assert mode.name == name
    assert not (mode.discriminator and mode.reward_fn)
    # A mode learns from its own samples exactly when something scores them, and only such a
    # mode is held near the reference by the KL penalty.
    assert mode.rollouts == (mode.discriminator or mode.reward_fn) == mode.reference
    # Without a reward function the demonstrations are the MLE targets or the real examples.
    assert mode.demonstrations == (not mode.reward_fn)


def test_value_heads_are_ppos():
    assert [m.name for m in MODE_TABLE.values() if m.value_head] == ["ppo", "rlhf"]


def test_grouped_modes_are_the_grpo_family():
    assert [m.name for m in MODE_TABLE.values() if m.grouped] == ["grpo", "rlhf-grpo"]


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="mode must be one of .*'gan'"):
        mode_spec("gan")
