"""podsweep services: one package each, a thin async shell around pure modules."""
