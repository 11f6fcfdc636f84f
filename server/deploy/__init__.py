"""What the study coordinator runs around the ServerApp: `pmfl coordinator` commands, the pilot PKI,
the SuperLink launcher and the following of deployed runs. Not part of the study app itself."""
