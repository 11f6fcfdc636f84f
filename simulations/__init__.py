"""Local federations for researchers: the real ServerApp and ClientApp in Flower's Simulation Engine,
built-in scenarios, and simulation-only attacks and faults."""
