import numpy as np
import pytest

from winnow.pipeline.data.uid import UID_DTYPE, array_to_uids, derive_uid, normalize_uid, uids_to_array


def test_derived_uid_is_128_bit_lowercase_hex_and_deterministic():
    uid = derive_uid("http://example.com/a.jpg", "a red star")
    assert len(uid) == 32 and uid == uid.lower() and int(uid, 16) >= 0
    assert uid == derive_uid("http://example.com/a.jpg", "a red star")


def test_derived_uid_depends_on_url_and_text_and_documents_missing_text_as_empty():
    a = derive_uid("http://x/1.jpg", "cat")
    assert a != derive_uid("http://x/2.jpg", "cat")
    assert a != derive_uid("http://x/1.jpg", "dog")
    assert derive_uid("http://x/1.jpg", None) == derive_uid("http://x/1.jpg", "")
    # the separator keeps (url, text) pairs apart that would collide if concatenated
    assert derive_uid("http://x/a", "b c") != derive_uid("http://x/a b", "c")


@pytest.mark.parametrize("given, expected", [
    ("ABCDEF0123456789abcdef0123456789", "abcdef0123456789abcdef0123456789"),
    ("  1f ", "0" * 30 + "1f"),
    ("0" * 32, "0" * 32),
])
def test_carried_uids_are_normalised(given, expected):
    assert normalize_uid(given) == expected


@pytest.mark.parametrize("bad", [None, "", "xyz", "g" * 32, "1" * 33, "12 34"])
def test_invalid_uids_are_rejected(bad):
    assert normalize_uid(bad) is None


def test_subset_array_is_sorted_u8_u8_with_upper_and_lower_halves():
    uids = ["ffffffffffffffff0000000000000001", "00000000000000010000000000000002", "00000000000000010000000000000001"]
    arr = uids_to_array(uids)
    assert arr.dtype == UID_DTYPE == np.dtype("u8,u8")
    assert list(arr["f0"]) == [1, 1, 2**64 - 1]
    assert list(arr["f1"]) == [1, 2, 1]
    assert array_to_uids(arr) == sorted(uids)
    assert uids_to_array([]).shape == (0,)


def test_uids_are_read_as_datacomp_reads_them():
    """DataComp packs a uid as (int(uid[:16], 16), int(uid[16:32], 16)): upper case and 31-character uids too."""
    from winnow.pipeline.core.errors import UserError

    given = ["0123456789abcdef0123456789abcdef", "FEDCBA9876543210FEDCBA9876543210",
             "123456789abcdef0123456789abcdef", "abc"]
    packed = uids_to_array(given, sort=False)
    assert [tuple(int(v) for v in p) for p in packed] == [(int(u[:16], 16), int(u[16:32] or "0", 16)) for u in given]
    for bad in (["0123456789abcdef0123456789abcdeg"], ["", "0" * 32], ["ü" * 16]):
        with pytest.raises(UserError, match="not hexadecimal"):
            uids_to_array(bad)
