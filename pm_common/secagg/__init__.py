"""Secure aggregation (SecAgg+): the cryptographic primitives and maths both sides share."""
