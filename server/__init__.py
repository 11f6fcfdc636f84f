"""The coordinator's side: the ServerApp (`server.app`), its strategies and run record. Tooling around
it lives in `server.deploy`."""
