"""The privacy auditor (`pmfl audit`): its rules, the reading of run and site directories, the HTML
report and the one-run empirical audit. Tooling: not part of the study app sites approve."""
