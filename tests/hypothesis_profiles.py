"""How many examples a hypothesis property test runs: the ``thorough`` and ``quick`` profiles.

* ``thorough`` (the default: ``make test``, CI): every property test runs the example count it states.
* ``quick`` (``make unit``, i.e. ``pytest tests/unit --hypothesis-profile=quick``): a ``QUICK_SHARE``-th of
  it, so the edit-test loop stays under 10 s. Same rules, same strategies, fewer examples; the full counts
  still run on every ``make test``.

Both are derandomized (the same examples every run, so a failure always reproduces) with no example database.
The conftest imports this module, so the profiles exist before pytest's ``--hypothesis-profile`` loads one;
a test module calls ``examples(n)`` at import, after that.
"""

from __future__ import annotations

from typing import Final

from hypothesis import HealthCheck, settings

THOROUGH: Final = "thorough"
QUICK: Final = "quick"
QUICK_SHARE: Final = 5
QUICK_FLOOR: Final = 10  # fewer examples than this hardly leave the strategies' simplest values

settings.register_profile(
    THOROUGH, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(QUICK, parent=settings.get_profile(THOROUGH))
settings.load_profile(THOROUGH)


def examples(thorough: int) -> int:
    """``thorough`` under the thorough profile; a ``QUICK_SHARE``-th of it (at least ``QUICK_FLOOR``) under quick."""
    if settings.get_current_profile_name() == QUICK:
        return max(thorough // QUICK_SHARE, QUICK_FLOOR)
    return thorough
