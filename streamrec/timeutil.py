"""One way to read a time: ISO 8601 text or a datetime, where no zone means UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def utc(value: datetime | str) -> datetime:
    """``value`` as an aware UTC datetime (ISO 8601 text is parsed; a naive time is UTC).

    Raises:
        ValueError: the text is not ISO 8601, the value is NaT, or the time falls outside years
            1..9999 in UTC.
    """
    if value != value or str(value) == "NaT":  # pandas' NaT (not a time) compares unequal to itself
        raise ValueError("not a time: NaT")
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
        raise ValueError(
            f"timestamp {when.isoformat()} falls outside years 1..9999 once converted to UTC"
        ) from None


def epoch_s(value: datetime | str | int | float) -> float:
    """Unix seconds of ``value`` (numbers are taken as Unix seconds already).

    Raises:
        ValueError: as :func:`utc`; also for a bool.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    return utc(value).timestamp()
