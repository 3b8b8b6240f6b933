import os
from pathlib import Path

import pytest

from rlgaf_fast.bench.seqgan_data import seqgan_oracle_path


def find_seqgan_oracle() -> Path:
    """SeqGAN's oracle parameters: $RLGAF_SEQGAN_ORACLE, else the cache `--oracle seqgan` fills.
    Missing, the test fails where RLGAF_REQUIRE_DATA=1 (CI) and is skipped elsewhere."""
    try:
        return seqgan_oracle_path("seqgan", download=False)
    except FileNotFoundError as error:
        if os.environ.get("RLGAF_REQUIRE_DATA", "0") not in ("", "0"):
            pytest.fail(f"RLGAF_REQUIRE_DATA is set: {error}")
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def seqgan_oracle() -> Path:
    return find_seqgan_oracle()
