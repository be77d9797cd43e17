import pytest

from sae.errors import SaeError
from sae.units import format_bytes, format_count, parse_count


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e9", 1_000_000_000),
        ("500M", 500_000_000),
        ("500m", 500_000_000),
        ("2B", 2_000_000_000),
        ("1_000_000", 1_000_000),
        ("12.5K", 12_500),
        ("4096", 4096),
        (" 3G ", 3_000_000_000),
        ("2.5e6", 2_500_000),
        (7, 7),
        (1e3, 1000),
        ("1.001K", 1001),  # exact: as a float product these came out just below the integer
        ("1.000001M", 1_000_001),
        ("0.1K", 100),
    ],
)
def test_parse_count_accepts_researcher_forms(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("-5", "cannot read"),
        ("lots", "cannot read"),
        ("", "cannot read"),
        ("1.5", "not a whole number"),
        ("0", "must be positive"),
        ("1__000", "underscore"),
        ("1e999", "too large"),
        ("1.0005K", "not a whole number"),
        (float("inf"), "not a finite"),
        ("5X", "cannot read"),
    ],
)
def test_parse_count_rejects_nonsense_with_a_message(text, fragment):
    with pytest.raises(SaeError) as err:
        parse_count(text, name="--tokens")
    message = str(err.value)
    assert message.startswith("--tokens:")
    assert fragment in message
    assert "\n" not in message


def test_zero_allowed_when_asked():
    assert parse_count("0", allow_zero=True) == 0


def test_formatting():
    assert format_count(1_000_000_000) == "1B"
    assert format_count(20_500_000) == "20.5M"
    assert format_count(17) == "17"
    assert format_bytes(4.6e12) == "4.2 TiB"
    assert format_bytes(512) == "512 B"
