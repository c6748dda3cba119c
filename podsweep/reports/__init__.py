"""Reading Trivy reports into podsweep's Report: shared by the parser and `podsweep check --report`."""
