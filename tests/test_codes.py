import os

import numpy as np
import pytest

from lowrank_jax.optim import _blockwise8
from lowrank_jax.quant import codes

REF = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "dynamic_maps.npz"))


@pytest.mark.parametrize("signed,key", [(True, "signed"), (False, "unsigned")])
def test_dynamic_map_matches_bitsandbytes_exactly(signed, key):
    m = codes.create_dynamic_map(signed=signed)
    assert m.dtype == np.float32 and m.shape == (256,)
    np.testing.assert_array_equal(m, REF[key])
    assert np.all(np.diff(m) >= 0)
    assert 0.0 in m and m[-1] == 1.0
    assert (m.min() < 0) == signed
    assert _blockwise8.dynamic_map(signed) is m


def test_optimizer_uses_quant_codes():
    assert _blockwise8.dynamic_map is codes.create_dynamic_map
    assert codes.create_dynamic_map(True) is codes.DYNAMIC


def test_untabulated_dynamic_map_arguments_are_refused_with_their_values():
    from lowrank_jax.quant import codes

    with pytest.raises(ValueError, match=r"got max_exponent_bits=6, total_bits=8"):
        codes.create_dynamic_map(True, max_exponent_bits=6)
