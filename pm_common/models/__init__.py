"""The models every site and the coordinator build identically from the study: tabular and image
models, all Opacus-compatible."""
