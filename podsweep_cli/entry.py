"""The `podsweep` console script. `podsweep cve` imports only what it reads (the inverted index's model, and S3 over
the stdlib's http.client where it can: services/parser/cvecli.py), so a script asking "who runs it?" is not kept
waiting for every service's imports; every other command loads the whole CLI (podsweep_cli.app), which also lists
`cve` in its help."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["cve"]:
        import gc

        from services.parser import cvecli

        gc.disable()  # a wide answer is tens of thousands of live objects and no cycles; the process ends after it
        sys.exit(cvecli.main(sys.argv[2:]))
    from podsweep_cli.app import app

    app()
