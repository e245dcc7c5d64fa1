import numpy as np
import pytest

import nybble
from nybble import codebooks

from reference import FP4, NF4


def test_nf4_table_is_the_shipped_one():
    assert codebooks.nf4().dtype == np.float32
    np.testing.assert_array_equal(codebooks.nf4(), NF4)


def test_nf4_construction_from_normal_quantiles():
    built = codebooks.nf4_from_normal_quantiles()
    exact = int((built == NF4).sum())
    assert exact >= 15, built
    np.testing.assert_allclose(built, NF4, rtol=0, atol=1e-6)
    # Same construction in float64 with scipy-free math: 8 positive, 7 negative, one zero.
    assert (built > 0).sum() == 8 and (built < 0).sum() == 7 and (built == 0).sum() == 1


def test_nf4_offset_is_validated():
    with pytest.raises(ValueError, match="offset"):
        codebooks.nf4_from_normal_quantiles(0.2)


def test_fp4_layout():
    np.testing.assert_array_equal(codebooks.fp4(), FP4)
    assert codebooks.fp4()[3] == 1.0 and codebooks.fp4()[11] == -1.0


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    F = pytest.importorskip("bitsandbytes.functional")
    np.testing.assert_array_equal(codebooks.dynamic_map(signed), F.create_dynamic_map(signed=signed).numpy())


def test_dynamic_map_landmarks():
    m = codebooks.dynamic_map(True)
    assert m[0] == np.float32(-0.99296875) and m[127] == 0.0 and m[255] == 1.0
    assert np.all(np.diff(m) > 0)


def test_bits_per_parameter_matches_paper():
    # QLoRA: 8/64 + 32/(64*256) = 0.127 bits of constants per parameter instead of 0.5.
    n = 4096 * 4096
    x = np.zeros(n, dtype=np.float32)
    x[::7] = 1.0
    _, st = nybble.quantize_4bit(x, blocksize=64, double_quant=True)
    assert st.bits_per_parameter() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)
    _, st = nybble.quantize_4bit(x, blocksize=64)
    assert st.bits_per_parameter() == pytest.approx(4.5)
