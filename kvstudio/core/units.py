"""Human-readable quantities, one way everywhere (CLI summaries, the studio's labels)."""

from __future__ import annotations

MIB = 2**20  # plots draw bytes in MiB


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'. Binary units, one decimal."""
    if abs(count) < 1024:
        return f"{int(count)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}"
