"""Deployment tooling shared by the coordinator's and the sites' commands (Flower's processes, the
study app's bundle and hash). Not part of the study app sites approve."""
