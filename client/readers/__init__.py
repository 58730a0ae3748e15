"""Readers: a hospital file (DICOM, PNG, PGM) or a data set folder -> pixels + the few facts training needs."""
