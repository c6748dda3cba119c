"""Text from a scanned image made safe for rich, in a module of its own so that `podsweep cve`'s table needs rich
and nothing of the report CLI (services/parser/cli.py, which reads S3 through boto3)."""

from __future__ import annotations

from rich.markup import escape

# The stored report has no C0 controls; C1 (U+0080-U+009F) is legal text there but some terminals act on it.
_C1 = dict.fromkeys(range(0x80, 0xA0))


def shown(value: str) -> str:
    """Text from a scanned image, safe to hand to rich: no markup, no C1 control characters."""
    return escape(value.translate(_C1))
