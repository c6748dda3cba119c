"""`python -m podsweep`: the door to the composition root (podsweep_cli). Nothing imports this module, so the
runtime below the services still imports none of them (tests/unit/test_layers.py allows this file alone)."""

from podsweep_cli.app import main

main()
