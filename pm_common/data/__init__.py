"""A site's data: the study's data contract and the readers that check and encode a site's files
(tables, DICOM, image folders, NPZ), plus the built-in and synthetic data sets."""
