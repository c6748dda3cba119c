"""The dispatcher: decides which digests to scan where, within limits, and builds the scan Jobs."""
