"""What crosses the wire between coordinator and sites: the record keys both sides agree on, and how
a model is packed into one record."""
