"""Process start-up helper shared by the long-running entry points: the event loop.

(Logging set-up lives in ``shared.logs.configure_logging``.)
"""

from __future__ import annotations

import asyncio


def use_uvloop() -> None:
    """Use uvloop when it is installed (it is a dependency everywhere but Windows)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
