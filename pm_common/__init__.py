"""What sites and the coordinator share: a study's settings, data contracts and readers, tasks and
models, privacy maths, the signed records, secure aggregation's primitives and the wire format.
Imports neither `client` nor `server`."""
