"""The hospital's side: the ClientApp (`client.app`) and what it needs at the site. Tooling around it
lives in `client.deploy`."""
