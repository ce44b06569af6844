"""Data stage of MM-LDM: audio <-> mel <-> audio image, vocoders, video I/O, datasets, synthetic data."""
