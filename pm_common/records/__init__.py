"""What sites sign and auditors read: the per-site privacy ledger, its signatures and hash chain, and
the run's roster every site signs before round 1."""
