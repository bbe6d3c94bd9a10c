"""Handlers the CLI test loads with ``orbitmesh agent --handlers tests.cli_handlers:...``."""

from __future__ import annotations

import orbitmesh as om


async def shout(text: str) -> str:
    return text.upper()


class Maths:
    @om.command()
    def double(self, x: int) -> int:
        return 2 * x

    @om.command("triple")
    async def times_three(self, x: int) -> int:
        return 3 * x


HANDLERS = [shout, Maths()]
