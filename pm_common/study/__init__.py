"""A study's settings: the study file, checked key by key, and what a run is told about it."""
