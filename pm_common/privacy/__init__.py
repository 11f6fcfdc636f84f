"""Differential privacy maths: a site's plan and cumulative budget (Opacus), the reference figure an
auditor recomputes (Google's dp-accounting), and hospital-level DP of the aggregate."""
