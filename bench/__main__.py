"""`make bench`: every benchmark of the project, one after the other."""

from bench import grad_sample_modes

if __name__ == "__main__":
    grad_sample_modes.main([])
