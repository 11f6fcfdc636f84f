"""The adversarial catalogue: one test per attack or fault, each naming the claim it checks.

Every test here plays an adversary (a hostile coordinator, a forger with write access to the run
directory, a careless or hostile study file, a process from another host) or a fault (a SIGKILL
mid-round, a resubmitted study) against one promise pmfl makes. docs/claims.md lists them.
"""
